//! Validation issues: what is wrong with a submitted document, and where.
//!
//! Planning never stops at the first problem. Every check pushes into an [`Issues`] collector
//! so the canvas can mark every faulty node and edge in one round trip; the codes are stable
//! strings a client may match on, the message is for people.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One problem found in a workflow document.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ValidationIssue {
    /// Stable snake_case code, one of the `codes` constants.
    pub code: String,
    /// The id of the node at fault, if any.
    pub node: Option<String>,
    /// The id of the edge at fault, if any.
    pub edge: Option<String>,
    /// The field at fault, e.g. `data.steps`, `sourceHandle`, `target`.
    pub field: Option<String>,
    /// A sentence naming the culprit.
    pub message: String,
}

impl fmt::Display for ValidationIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}] {}", self.code, self.message)
    }
}

/// The issue codes, kept here so tests and clients share one spelling.
pub mod codes {
    /// The document is not the expected shape (not an object, nodes not an array, ...).
    pub const INVALID_DOCUMENT: &str = "invalid_document";
    /// A node or edge id holds a control character (a line break, a tab, NUL): ids become
    /// file names, log fields and header values, where those characters do harm.
    pub const INVALID_ID: &str = "invalid_id";
    pub const DUPLICATE_NODE_ID: &str = "duplicate_node_id";
    pub const DUPLICATE_EDGE_ID: &str = "duplicate_edge_id";
    /// An edge (or a binding) names a node that does not exist.
    pub const MISSING_NODE: &str = "missing_node";
    /// The target has several inputs that could take the artifact and the edge picks none.
    pub const MISSING_HANDLE: &str = "missing_handle";
    /// The handle is an artifact kind that several inputs of the target accept.
    pub const AMBIGUOUS_HANDLE: &str = "ambiguous_handle";
    /// The handle names no input (or output) of the step.
    pub const UNKNOWN_HANDLE: &str = "unknown_handle";
    pub const CYCLE: &str = "cycle";
    pub const UNKNOWN_TYPE: &str = "unknown_type";
    pub const MISSING_PARAMETER: &str = "missing_parameter";
    pub const INVALID_PARAMETER: &str = "invalid_parameter";
    /// A `data` field the step type (or its template) does not know.
    pub const UNKNOWN_PARAMETER: &str = "unknown_parameter";
    pub const WRONG_INPUT_KIND: &str = "wrong_input_kind";
    pub const MISSING_INPUT: &str = "missing_input";
    pub const TOO_MANY_INPUTS: &str = "too_many_inputs";
    /// An edge leaves a step that produces nothing (an `output` step).
    pub const NO_OUTPUT: &str = "no_output";
    /// An edge is routed to a binding pinned to another source step.
    pub const BINDING_SOURCE_MISMATCH: &str = "binding_source_mismatch";
    pub const UNKNOWN_TEMPLATE: &str = "unknown_template";
    /// An inline ComfyUI graph that is not in API format (e.g. a UI export).
    pub const INVALID_WORKFLOW: &str = "invalid_workflow";
    pub const NO_CAPABLE_NODE: &str = "no_capable_node";
    /// Part of the document is nested deeper than [`crate::workflow::MAX_DEPTH`] levels.
    pub const TOO_DEEP: &str = "too_deep";
    /// The document has more nodes than the daemon's `max_steps`.
    pub const TOO_MANY_STEPS: &str = "too_many_steps";
}

/// Collects issues while a document is checked.
#[derive(Debug, Default)]
pub(crate) struct Issues {
    list: Vec<ValidationIssue>,
}

impl Issues {
    pub(crate) fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub(crate) fn into_vec(self) -> Vec<ValidationIssue> {
        self.list
    }

    /// An issue about the document as a whole.
    pub(crate) fn document(&mut self, field: Option<&str>, message: impl Into<String>) {
        self.push(codes::INVALID_DOCUMENT, None, None, field, message);
    }

    /// An issue with its own code about a field of the document as a whole.
    pub(crate) fn document_field(&mut self, code: &str, field: &str, message: impl Into<String>) {
        self.push(code, None, None, Some(field), message);
    }

    /// An issue about a node, optionally one of its fields.
    pub(crate) fn node(
        &mut self,
        code: &str,
        node: &str,
        field: Option<&str>,
        message: impl Into<String>,
    ) {
        self.push(code, Some(node), None, field, message);
    }

    /// An issue about an edge, optionally one of its fields.
    pub(crate) fn edge(
        &mut self,
        code: &str,
        edge: &str,
        field: Option<&str>,
        message: impl Into<String>,
    ) {
        self.push(code, None, Some(edge), field, message);
    }

    /// An issue about an edge that also names the node it concerns.
    pub(crate) fn edge_at_node(
        &mut self,
        code: &str,
        edge: &str,
        node: &str,
        field: Option<&str>,
        message: impl Into<String>,
    ) {
        self.push(code, Some(node), Some(edge), field, message);
    }

    fn push(
        &mut self,
        code: &str,
        node: Option<&str>,
        edge: Option<&str>,
        field: Option<&str>,
        message: impl Into<String>,
    ) {
        self.list.push(ValidationIssue {
            code: code.to_owned(),
            node: node.map(str::to_owned),
            edge: edge.map(str::to_owned),
            field: field.map(str::to_owned),
            message: message.into(),
        });
    }
}

/// A short, bounded description of a JSON value for messages: the value itself when small,
/// its type otherwise. Keeps a megabyte of garbage out of an error message.
pub(crate) fn describe(value: &serde_json::Value) -> String {
    use serde_json::Value;
    match value {
        Value::Null => "null".to_owned(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) if s.chars().count() <= 40 => format!("the string {s:?}"),
        Value::String(_) => "a long string".to_owned(),
        Value::Array(_) => "an array".to_owned(),
        Value::Object(_) => "an object".to_owned(),
    }
}
