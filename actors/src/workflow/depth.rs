//! The nesting limit: how deep a submitted document may go.
//!
//! A run is stored with its document inside the record, a level or two deeper than the
//! client sent it. serde_json refuses to read anything nested 128 levels or more, so a
//! document the request parser just accepted could become a record that can never be read
//! back. Refusing anything deeper than [`MAX_DEPTH`] at submit, well under that ceiling,
//! keeps every accepted run readable; no real canvas or ComfyUI graph comes close.

use serde_json::Value;

use super::issue::{codes, Issues};

/// The deepest nesting a workflow document may have, counting the document's own object as
/// level 1 (so `nodes` is level 2, a node level 3 and its `position` level 4).
pub const MAX_DEPTH: usize = 64;

/// Longest object key shown in a path; longer ones are cut.
const MAX_KEY_CHARS: usize = 40;

/// Reports each part of the document nested deeper than [`MAX_DEPTH`]: one issue per node,
/// per edge and per other top-level field, naming the path to it. Returns whether the
/// document is within the limit.
pub(crate) fn check(document: &Value, issues: &mut Issues) -> bool {
    let Some(root) = document.as_object() else {
        return true;
    };
    let mut within = true;
    for (key, value) in root {
        let entries = match (key.as_str(), value) {
            ("nodes" | "edges", Value::Array(entries)) => entries,
            _ => {
                if let Some(path) = too_deep(value, 2) {
                    let field = format!("{}{path}", segment_key(key));
                    issues.document_field(codes::TOO_DEEP, &field, message(&field));
                    within = false;
                }
                continue;
            }
        };
        for (index, entry) in entries.iter().enumerate() {
            let Some(path) = too_deep(entry, 3) else {
                continue;
            };
            within = false;
            let full = format!("{key}[{index}]{path}");
            let id = entry
                .get("id")
                .and_then(Value::as_str)
                .filter(|id| !id.is_empty());
            let relative = path.strip_prefix('.').unwrap_or(&path);
            match (key.as_str(), id) {
                ("nodes", Some(id)) if !relative.is_empty() => {
                    let text = format!("node '{id}': {}", message(&full));
                    issues.node(codes::TOO_DEEP, id, Some(relative), text);
                }
                ("edges", Some(id)) if !relative.is_empty() => {
                    let text = format!("edge '{id}': {}", message(&full));
                    issues.edge(codes::TOO_DEEP, id, Some(relative), text);
                }
                _ => issues.document_field(codes::TOO_DEEP, &full, message(&full)),
            }
        }
    }
    within
}

fn message(path: &str) -> String {
    format!(
        "{path} is nested deeper than {MAX_DEPTH} levels, the most a workflow document may \
         have"
    )
}

/// The path, relative to `value` (which sits at `depth`), of the first branch that goes
/// deeper than [`MAX_DEPTH`], cut after its last object key: `position[0][0]...` is named
/// `position`.
fn too_deep(value: &Value, depth: usize) -> Option<String> {
    let mut path = Vec::new();
    descend(value, depth, &mut path).then(|| render(&path))
}

/// Whether `value` at `depth` goes deeper than the limit, leaving the path to where it does
/// in `path`. The recursion stops at the limit, so no input can exhaust the stack.
fn descend<'a>(value: &'a Value, depth: usize, path: &mut Vec<Segment<'a>>) -> bool {
    let children: Box<dyn Iterator<Item = (Segment<'a>, &'a Value)>> = match value {
        Value::Array(items) => Box::new(
            items
                .iter()
                .enumerate()
                .map(|(index, item)| (Segment::Index(index), item)),
        ),
        Value::Object(fields) => {
            Box::new(fields.iter().map(|(key, field)| (Segment::Key(key), field)))
        }
        _ => return false,
    };
    if depth > MAX_DEPTH {
        return true;
    }
    for (segment, child) in children {
        path.push(segment);
        if descend(child, depth + 1, path) {
            return true;
        }
        path.pop();
    }
    false
}

#[derive(Clone, Copy)]
enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

/// `.key[0].other`, without the array indices after the last key.
fn render(path: &[Segment<'_>]) -> String {
    let last_key = path
        .iter()
        .rposition(|segment| matches!(segment, Segment::Key(_)));
    let kept = last_key.map_or(&path[..0], |last| &path[..=last]);
    kept.iter()
        .map(|segment| match segment {
            Segment::Key(key) => format!(".{}", segment_key(key)),
            Segment::Index(index) => format!("[{index}]"),
        })
        .collect()
}

fn segment_key(key: &str) -> String {
    if key.chars().count() <= MAX_KEY_CHARS {
        key.to_owned()
    } else {
        let cut: String = key.chars().take(MAX_KEY_CHARS).collect();
        format!("{cut}…")
    }
}
