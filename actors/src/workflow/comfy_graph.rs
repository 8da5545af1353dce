//! ComfyUI API-format graphs: checking their shape and injecting values into them.
//!
//! An API-format graph maps node ids to `{class_type, inputs}`; an input is either a literal
//! or a link `[node_id, output_index]`. Everything we put into a graph (parameters, upstream
//! text, uploaded file names) goes in by node id and input name on the parsed JSON, never by
//! text substitution, so a prompt containing quotes or `$` cannot change the graph's shape.

use serde_json::Value;

use crate::artifact::ArtifactKind;

/// At most this many shape problems are reported per graph; past that the graph is plainly
/// not what we expect and more lines would only bury the first ones.
const MAX_SHAPE_PROBLEMS: usize = 10;

/// Output nodes whose files are videos (animated images count: Wan's example saves one).
const VIDEO_SAVERS: &[&str] = &[
    "SaveAnimatedPNG",
    "SaveAnimatedWEBP",
    "SaveVideo",
    "SaveWEBM",
    "VHS_VideoCombine",
];
/// Output nodes whose files are still images.
const IMAGE_SAVERS: &[&str] = &["SaveImage", "PreviewImage"];

/// Checks that `graph` is an API-format prompt. Returns the problems found, each a sentence;
/// a UI-format export (the canvas file with `nodes` and `links` arrays) gets one clear
/// sentence telling how to export the right format.
pub(crate) fn check_api_format(graph: &Value) -> Vec<String> {
    let Some(nodes) = graph.as_object() else {
        return vec![format!(
            "a ComfyUI workflow must be an API-format object {{node_id: {{class_type, inputs}}}}, \
             got {}",
            super::issue::describe(graph)
        )];
    };
    if nodes.get("nodes").is_some_and(Value::is_array)
        || nodes.get("links").is_some_and(Value::is_array)
    {
        return vec![
            "this is a ComfyUI UI-format workflow (it has \"nodes\"/\"links\" arrays), not the \
             API format ComfyUI's /prompt takes; in ComfyUI use \"Export (API)\" and submit that"
                .to_owned(),
        ];
    }
    if nodes.is_empty() {
        return vec!["the ComfyUI workflow has no nodes".to_owned()];
    }

    let mut problems = Vec::new();
    for (id, node) in nodes {
        if problems.len() >= MAX_SHAPE_PROBLEMS {
            break;
        }
        let Some(node) = node.as_object() else {
            problems.push(format!("ComfyUI node \"{id}\" must be an object"));
            continue;
        };
        match node.get("class_type") {
            Some(Value::String(class)) if !class.is_empty() => {}
            _ => problems.push(format!("ComfyUI node \"{id}\" has no class_type string")),
        }
        let Some(inputs) = node.get("inputs").and_then(Value::as_object) else {
            problems.push(format!("ComfyUI node \"{id}\" has no inputs object"));
            continue;
        };
        for (input, value) in inputs {
            if let Some((target, _)) = as_link(value) {
                if !nodes.contains_key(target) {
                    problems.push(format!(
                        "ComfyUI node \"{id}\" input \"{input}\" links to node \"{target}\", \
                         which the workflow lacks"
                    ));
                }
            }
        }
    }
    problems
}

/// A link input `[node_id, output_index]`.
fn as_link(value: &Value) -> Option<(&str, u64)> {
    match value.as_array()?.as_slice() {
        [Value::String(node), Value::Number(index)] => Some((node, index.as_u64()?)),
        _ => None,
    }
}

/// Whether a string input value is a binding placeholder: `$` then a name.
pub(crate) fn is_placeholder(value: &str) -> bool {
    let Some(name) = value.strip_prefix('$') else {
        return false;
    };
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// Every (node id, input name) whose value is exactly the string `placeholder`.
pub(crate) fn find_value(graph: &Value, placeholder: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for (id, node) in graph.as_object().into_iter().flatten() {
        let inputs = node.get("inputs").and_then(Value::as_object);
        for (input, value) in inputs.into_iter().flatten() {
            if value.as_str() == Some(placeholder) {
                found.push((id.clone(), input.clone()));
            }
        }
    }
    found
}

/// Every placeholder string used in the graph, sorted and without repeats.
pub(crate) fn placeholders(graph: &Value) -> Vec<String> {
    let mut found: Vec<String> = graph
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(_, node)| node.get("inputs").and_then(Value::as_object))
        .flatten()
        .filter_map(|(_, value)| value.as_str())
        .filter(|value| is_placeholder(value))
        .map(str::to_owned)
        .collect();
    found.sort();
    found.dedup();
    found
}

/// Whether the graph has node `node` with an input named `input`.
pub(crate) fn has_input(graph: &Value, node: &str, input: &str) -> bool {
    graph
        .get(node)
        .and_then(|node| node.get("inputs"))
        .and_then(Value::as_object)
        .is_some_and(|inputs| inputs.contains_key(input))
}

/// Sets `inputs[input]` of node `node`. Fails (naming both) when the node or its inputs
/// object is missing; an input not yet present is added, as ComfyUI's optional inputs are.
pub(crate) fn set_input(
    graph: &mut Value,
    node: &str,
    input: &str,
    value: Value,
) -> Result<(), String> {
    let inputs = graph
        .get_mut(node)
        .and_then(|node| node.get_mut("inputs"))
        .and_then(Value::as_object_mut)
        .ok_or_else(|| format!("the workflow has no node \"{node}\" with inputs"))?;
    inputs.insert(input.to_owned(), value);
    Ok(())
}

/// What a graph's outputs are, judged by its output nodes: video if any saver writes video,
/// else image if any saves images, else data.
pub(crate) fn infer_output_kind(graph: &Value) -> ArtifactKind {
    let classes: Vec<&str> = graph
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(_, node)| node.get("class_type").and_then(Value::as_str))
        .collect();
    if classes.iter().any(|class| VIDEO_SAVERS.contains(class)) {
        ArtifactKind::Video
    } else if classes.iter().any(|class| IMAGE_SAVERS.contains(class)) {
        ArtifactKind::Image
    } else {
        ArtifactKind::Data
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn invert() -> Value {
        json!({
            "1": {"class_type": "LoadImage", "inputs": {"image": "$input"}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}}
        })
    }

    #[test]
    fn api_format_passes() {
        assert!(check_api_format(&invert()).is_empty());
    }

    #[test]
    fn ui_format_is_named_as_such() {
        let ui = json!({"last_node_id": 3, "nodes": [], "links": [], "version": 0.4});
        let problems = check_api_format(&ui);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("UI-format"), "{problems:?}");
        assert!(problems[0].contains("Export (API)"));
    }

    #[test]
    fn shape_problems_are_reported() {
        let graph = json!({
            "1": {"inputs": {}},
            "2": {"class_type": "X", "inputs": {"a": ["9", 0]}},
            "3": 5,
        });
        let problems = check_api_format(&graph);
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(check_api_format(&json!([1, 2])).len() == 1);
        assert!(check_api_format(&json!({})).len() == 1);
    }

    #[test]
    fn placeholders_and_injection() {
        let mut graph = invert();
        assert_eq!(placeholders(&graph), vec!["$input".to_owned()]);
        assert_eq!(
            find_value(&graph, "$input"),
            vec![("1".to_owned(), "image".to_owned())]
        );
        set_input(&mut graph, "1", "image", json!("a.png")).unwrap();
        assert_eq!(graph["1"]["inputs"]["image"], "a.png");
        assert!(set_input(&mut graph, "9", "image", json!(1)).is_err());
        assert!(is_placeholder("$a_b-1"));
        assert!(!is_placeholder("$5 bill"));
        assert!(!is_placeholder("$"));
    }

    #[test]
    fn output_kind_follows_savers() {
        assert_eq!(infer_output_kind(&invert()), ArtifactKind::Image);
        let video = json!({"1": {"class_type": "SaveAnimatedPNG", "inputs": {}}});
        assert_eq!(infer_output_kind(&video), ArtifactKind::Video);
        assert_eq!(infer_output_kind(&json!({})), ArtifactKind::Data);
    }
}
