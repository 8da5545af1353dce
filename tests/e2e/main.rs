//! End-to-end tests: a real daemon with simulated ComfyUI and LangFlow nodes, all on
//! loopback port 0, driven only through HTTP and WebSocket as clients drive it.

mod artifacts;
mod auth;
mod failures;
mod http_input;
mod real_services;
mod runs;
mod util;
mod validation;
