//! Workflows: the canvas document, its validation, its plan, and the jobs its steps become.
//!
//! A workflow arrives as the React Flow document the canvas saves (or the same JSON from MCP
//! or a script). [`plan_workflow`] checks it against what the cluster offers (a [`Catalog`]
//! of nodes and ComfyUI templates) and either returns a [`Plan`], a petgraph DAG of steps in
//! a topological order, or every problem at once as [`ValidationIssue`]s naming the node,
//! edge and field at fault. Nothing runs until a document plans cleanly, so a typo costs a
//! red node on the canvas rather than a failed GPU job.
//!
//! At run time the `WorkflowRun` actor hands each ready step its upstream artifacts and
//! calls [`PlannedStep::render`] to get the concrete [`Job`]: text the daemon produces
//! itself, a ComfyUI prompt with its uploads, or a LangFlow call.
//!
//! Layout:
//! - `document`: reading the raw JSON leniently, without panicking on anything.
//! - `step`: the step types, their `data` fields, inputs and requirements.
//! - `template` and `comfy_graph`: ComfyUI templates and API-format graph handling.
//! - `catalog`: what the cluster offers and what a step needs ([`Requirement`]).
//! - `plan`: edges, handles, cycles and ordering.
//! - `retry`: the per-step [`RetryPolicy`] (`data.retry` over `options.retry` over default).
//! - `render`: steps into jobs.
//!
//! The `data` fields of each step type are the contract between canvas, REST, MCP and CLI;
//! docs/workflows.md is their reference.

mod catalog;
mod comfy_graph;
mod depth;
mod document;
mod issue;
mod plan;
mod render;
mod retry;
mod step;
mod template;

#[cfg(test)]
mod tests;

pub use catalog::{Catalog, Requirement, Service, GENERIC_COMFY};
pub use depth::MAX_DEPTH;
pub use issue::{codes, ValidationIssue};
pub use plan::{Plan, PlannedStep, RunOptions, StepInput};
pub use render::{ComfyJob, InputArtifact, Job, LangflowJob, RenderError, UploadSlot};
pub use retry::{RetryPolicy, MAX_BACKOFF};
pub use step::{StepKind, PROMPT_EXPANSION_FLOW};
pub use template::{
    ParamSource, ParamSpec, ParamType, Target, Template, TemplateError, TemplateKind,
    TemplateLibrary,
};

/// Validates a submitted document against the catalog and plans it. Reports every problem
/// at once; never panics, whatever the JSON. A document nested deeper than [`MAX_DEPTH`] is
/// refused with `too_deep` issues alone, before anything else is read.
pub fn plan_workflow(
    document: &serde_json::Value,
    catalog: &Catalog,
) -> Result<Plan, Vec<ValidationIssue>> {
    plan::plan(document, catalog)
}
