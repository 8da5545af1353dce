//! The Multiplex daemon: configuration, the HTTP interfaces and the CLI's client side.
//!
//! - [`auth`]: bearer tokens and their roles.
//! - [`config`]: the TOML file, the embedded default, and starting simulated nodes.
//! - [`daemon`]: wiring: store, actors (from `multiplex-actors`) and the HTTP server.
//! - [`http`]: REST admin API, artifact downloads and the UI WebSocket.
//! - [`mcp`]: the MCP server at /mcp, and `multiplex mcp`, its stdio relay.
//! - [`client`]: what `multiplex submit`, `status` and `nodes` use to talk to a daemon.
//! - [`harness`]: simulators and a daemon as child processes, to kill and restart.
//! - [`soak`]: `multiplex soak`, many runs while processes are killed at random.
//!
//! The binary (`src/main.rs`) only parses the command line and calls into these.

pub mod auth;
pub mod client;
pub mod config;
pub mod daemon;
pub mod harness;
pub mod http;
pub mod mcp;
pub mod soak;
