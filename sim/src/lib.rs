//! Protocol-faithful stand-ins for ComfyUI and LangFlow.
//!
//! Multiplex's demo, integration tests and benchmarks need peers that behave
//! like the real servers, odd corners included, without GPUs or model
//! weights. Every shape here is derived from recordings of ComfyUI 0.3.64
//! and LangFlow 1.13 (see `shared/fixtures`).
//!
//! - [`comfyui`]: HTTP + WebSocket ComfyUI simulator with a queue, history,
//!   caching, previews, uploads and real (small) image and video outputs.
//! - [`langflow`]: the LangFlow run API with a few built-in flows.
//! - [`media`]: deterministic PNG / animated PNG / animated WebP generation.
//! - Both simulators run inside an existing actix System and can be stopped.

pub mod comfyui;
mod http;
pub mod langflow;
pub mod media;

pub use comfyui::{serve_comfyui_forever, ComfySim, ComfySimConfig};
pub use langflow::{serve_langflow_forever, FlowBehavior, LangflowSim, LangflowSimConfig, SimFlow};
