//! Reading the React Flow document the canvas saves.
//!
//! The document arrives as arbitrary JSON from a browser, an AI assistant or a script, so it is
//! walked by hand rather than deserialized into strict structs: a serde error stops at the
//! first problem and names a byte offset, while a canvas wants every faulty node and edge at
//! once, by id. UI-only fields (`position`, `selected`, `style`, `measured`, ...) are ignored.

use serde_json::{Map, Value};

use super::issue::{codes, describe, Issues};
use super::plan::RunOptions;
use super::retry::{self, RetryPolicy};

/// The document, reduced to what planning needs. Entries that were too broken to use (no id)
/// have already been reported and dropped.
#[derive(Debug)]
pub(crate) struct Document {
    pub name: String,
    pub options: RunOptions,
    pub nodes: Vec<RawNode>,
    pub edges: Vec<RawEdge>,
}

#[derive(Debug)]
pub(crate) struct RawNode {
    pub id: String,
    /// `None` when the node has no usable `type`, already reported.
    pub kind: Option<String>,
    /// The node's `data`, `{}` when absent or null.
    pub data: Map<String, Value>,
}

#[derive(Debug)]
pub(crate) struct RawEdge {
    pub id: String,
    pub source: Option<String>,
    pub target: Option<String>,
    pub source_handle: Option<String>,
    pub target_handle: Option<String>,
}

/// Name used when the document has none.
const UNTITLED: &str = "untitled";

/// Reads the document's shape, reporting every malformed part. Returns `None` only when the
/// root is unusable (not an object, or without a node list).
pub(crate) fn read(document: &Value, issues: &mut Issues) -> Option<Document> {
    let Some(root) = document.as_object() else {
        issues.document(
            None,
            format!(
                "a workflow must be a JSON object, got {}",
                describe(document)
            ),
        );
        return None;
    };

    let name = match root.get("name") {
        None | Some(Value::Null) => UNTITLED.to_owned(),
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        Some(other) => {
            let got = describe(other);
            issues.document(
                Some("name"),
                format!("name must be a non-empty string, got {got}"),
            );
            UNTITLED.to_owned()
        }
    };

    let options = read_options(root.get("options"), issues);

    let nodes = match root.get("nodes") {
        Some(Value::Array(nodes)) => read_nodes(nodes, issues),
        None => {
            issues.document(Some("nodes"), "the workflow has no \"nodes\" array");
            return None;
        }
        Some(other) => {
            let got = describe(other);
            issues.document(
                Some("nodes"),
                format!("\"nodes\" must be an array, got {got}"),
            );
            return None;
        }
    };
    if nodes.is_empty() && issues.is_empty() {
        issues.document(Some("nodes"), "the workflow has no steps");
    }

    let edges = match root.get("edges") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(edges)) => read_edges(edges, issues),
        Some(other) => {
            let got = describe(other);
            issues.document(
                Some("edges"),
                format!("\"edges\" must be an array, got {got}"),
            );
            Vec::new()
        }
    };

    Some(Document {
        name,
        options,
        nodes,
        edges,
    })
}

/// Reads `options`. `retry` is checked by hand, so that a bad value is named by its field
/// (`options.retry.attempts`) and its range is enforced; the rest goes through serde, which
/// refuses unknown option names.
fn read_options(options: Option<&Value>, issues: &mut Issues) -> RunOptions {
    let mut options = match options {
        None | Some(Value::Null) => return RunOptions::default(),
        Some(value) => value.clone(),
    };
    let retry = match options.as_object_mut().and_then(|o| o.remove("retry")) {
        None => RetryPolicy::default(),
        Some(value) => {
            let (retry, problems) = retry::read(&value);
            for problem in problems {
                let field = format!("options.{}", problem.field);
                issues.document(Some(&field), format!("options {}", problem.message));
            }
            RetryPolicy::default().overridden(retry)
        }
    };
    match serde_json::from_value::<RunOptions>(options) {
        Ok(options) => RunOptions { retry, ..options },
        Err(err) => {
            issues.document(Some("options"), format!("options are invalid: {err}"));
            RunOptions {
                retry,
                ..RunOptions::default()
            }
        }
    }
}

fn read_nodes(nodes: &[Value], issues: &mut Issues) -> Vec<RawNode> {
    let mut out = Vec::with_capacity(nodes.len());
    for (index, node) in nodes.iter().enumerate() {
        let Some(node) = node.as_object() else {
            let field = format!("nodes[{index}]");
            let got = describe(node);
            issues.document(
                Some(&field),
                format!("node #{index} must be an object, got {got}"),
            );
            continue;
        };
        let Some(id) = read_id(node, "nodes", index, issues) else {
            continue;
        };

        let kind = match node.get("type") {
            Some(Value::String(kind)) if !kind.is_empty() => Some(kind.clone()),
            None | Some(Value::Null) => {
                let message = format!("node '{id}' has no type");
                issues.node(codes::UNKNOWN_TYPE, &id, Some("type"), message);
                None
            }
            Some(other) => {
                let message = format!("node '{id}' type must be a string, got {}", describe(other));
                issues.node(codes::UNKNOWN_TYPE, &id, Some("type"), message);
                None
            }
        };

        let data = match node.get("data") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(data)) => data.clone(),
            Some(other) => {
                let message = format!(
                    "node '{id}' data must be an object, got {}",
                    describe(other)
                );
                issues.node(codes::INVALID_DOCUMENT, &id, Some("data"), message);
                Map::new()
            }
        };

        out.push(RawNode { id, kind, data });
    }
    out
}

fn read_edges(edges: &[Value], issues: &mut Issues) -> Vec<RawEdge> {
    let mut out = Vec::with_capacity(edges.len());
    for (index, edge) in edges.iter().enumerate() {
        let Some(edge) = edge.as_object() else {
            let field = format!("edges[{index}]");
            let got = describe(edge);
            issues.document(
                Some(&field),
                format!("edge #{index} must be an object, got {got}"),
            );
            continue;
        };
        let Some(id) = read_id(edge, "edges", index, issues) else {
            continue;
        };

        let mut endpoint = |field: &str| match edge.get(field) {
            Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
            None | Some(Value::Null) => {
                let message = format!("edge '{id}' has no {field}");
                issues.edge(codes::MISSING_NODE, &id, Some(field), message);
                None
            }
            Some(other) => {
                let got = describe(other);
                let message = format!("edge '{id}' {field} must be a node id string, got {got}");
                issues.edge(codes::INVALID_DOCUMENT, &id, Some(field), message);
                None
            }
        };
        let source = endpoint("source");
        let target = endpoint("target");

        let mut handle = |field: &str| match edge.get(field) {
            // React Flow writes null for the default handle; an empty string means the same.
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.is_empty() => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => {
                let got = describe(other);
                let message = format!("edge '{id}' {field} must be a string or null, got {got}");
                issues.edge(codes::UNKNOWN_HANDLE, &id, Some(field), message);
                None
            }
        };
        let source_handle = handle("sourceHandle");
        let target_handle = handle("targetHandle");

        out.push(RawEdge {
            id,
            source,
            target,
            source_handle,
            target_handle,
        });
    }
    out
}

/// Reads an entry's `id`, which must be a non-empty string (React Flow ids are strings; a
/// number is refused rather than converted so that `1` and `"1"` can never be confused)
/// without control characters (a step id names its artifacts' files).
fn read_id(
    entry: &Map<String, Value>,
    list: &str,
    index: usize,
    issues: &mut Issues,
) -> Option<String> {
    let field = format!("{list}[{index}].id");
    let what = if list == "nodes" { "node" } else { "edge" };
    match entry.get("id") {
        Some(Value::String(id)) if id.chars().any(char::is_control) => {
            // Kept, so that edges to the node do not also report it missing.
            let message = format!(
                "{what} id {id:?} contains a control character; ids may hold any other text"
            );
            if list == "nodes" {
                issues.node(codes::INVALID_ID, id, Some("id"), message);
            } else {
                issues.edge(codes::INVALID_ID, id, Some("id"), message);
            }
            Some(id.clone())
        }
        Some(Value::String(id)) if !id.is_empty() => Some(id.clone()),
        None | Some(Value::Null) => {
            issues.document(Some(&field), format!("{what} #{index} has no id"));
            None
        }
        Some(other) => {
            let got = describe(other);
            let message = format!("{what} #{index} id must be a non-empty string, got {got}");
            issues.document(Some(&field), message);
            None
        }
    }
}
