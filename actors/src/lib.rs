//! The Multiplex actor system and everything the actors drive.
//!
//! Components, following the data flow of a run:
//!
//! - [`workflow`]: the canvas document, its validation and its plan (a petgraph DAG), and the
//!   rendering of each step into the concrete job a node runs.
//! - [`run`]: the `WorkflowRun` actor, one per submitted workflow; it walks the plan, hands
//!   ready steps to the scheduler and passes artifacts from step to step.
//! - [`scheduler`]: the `Scheduler` actor; it places each task on the best node.
//! - [`node`]: the `GpuNode` actor, one per configured box, which drives its services through
//!   the protocol clients in [`comfyui`] and [`langflow`].
//! - [`tunnel`]: the `Tunnel` actor, one per node reached through SSH: session, local
//!   forwards, keepalive and reconnection.
//! - [`activity`]: the `ActivityHub` actor, fanning live events out to every subscriber.
//! - [`store`]: the sled store for runs and steps, and the content-addressed artifact files.
//! - [`config`]: the cluster description the daemon is started with.
//! - [`cluster`]: the handle that starts all of the above and answers the daemon's API.
//! - [`lease`]: nodes reserved for one client for a while, honoured by the scheduler.
//! - [`task`]: the messages that carry one step's work between run, scheduler and node.

pub mod activity;
pub mod artifact;
pub mod cluster;
pub mod comfyui;
pub mod config;
pub mod langflow;
pub mod lease;
pub mod node;
pub mod run;
pub mod scheduler;
pub mod store;
pub mod task;
pub mod tunnel;
pub mod workflow;
