//! Planning and rendering through the public API, against a four-box test cluster.
//!
//! Validation tests each build the smallest document that shows one issue and assert its code
//! and the node, edge and field it names: those three are what the canvas highlights.

use std::path::PathBuf;

use serde_json::{json, Value};

use super::*;
use crate::artifact::{ArtifactKind, ArtifactMeta};
use crate::config::ClusterConfig;

const LIGHTHOUSE: &str = include_str!("../../../config/workflows/lighthouse.json");
const TWO_BRANCHES: &str = include_str!("../../../config/workflows/two-branches.json");
const INVERT: &str = include_str!("../../../config/workflows/invert.json");

fn catalog() -> Catalog {
    let cluster: ClusterConfig = serde_json::from_value(json!({
        "default_image_template": "flux-txt2img",
        "default_video_template": "wan21-i2v",
        "nodes": [
            {"name": "box1", "gpus": [{"model": "RTX A6000", "vram_mb": 49140}],
             "comfyui": {"url": "http://127.0.0.1:8188", "capabilities": ["image", "video"]}},
            {"name": "box2", "gpus": [{"model": "RTX 4090", "vram_mb": 24564}],
             "comfyui": {"url": "http://127.0.0.1:8189", "capabilities": ["image"]}},
            {"name": "box3", "gpus": [{"model": "RTX 3060", "vram_mb": 12288}],
             "langflow": {"url": "http://127.0.0.1:7860", "flows": {
                "narration-text": {"id": "f1"},
                "narration-visual": {"id": "f2", "file_component": "ChatInput-1"},
                "prompt-expansion": {"id": "f3"}}}}
        ]
    }))
    .expect("the test cluster is valid");
    Catalog::new(
        &cluster,
        TemplateLibrary::builtin().expect("built-in templates load"),
    )
}

fn plan(document: &Value) -> Result<Plan, Vec<ValidationIssue>> {
    plan_workflow(document, &catalog())
}

fn issues(document: Value) -> Vec<ValidationIssue> {
    match plan(&document) {
        Ok(_) => panic!("expected issues for {document}"),
        Err(issues) => issues,
    }
}

/// The single issue with `code`, failing with all issues shown otherwise.
fn only(document: Value, code: &str) -> ValidationIssue {
    let all = issues(document);
    let found: Vec<_> = all.iter().filter(|i| i.code == code).cloned().collect();
    assert_eq!(found.len(), 1, "expected one {code} in {all:#?}");
    found.into_iter().next().unwrap_or_else(|| unreachable!())
}

fn doc(nodes: Value, edges: Value) -> Value {
    json!({"name": "t", "nodes": nodes, "edges": edges})
}

fn intent(id: &str) -> Value {
    json!({"id": id, "type": "intent", "data": {"prompt": "a lighthouse"}})
}

fn image(id: &str) -> Value {
    json!({"id": id, "type": "image", "data": {}})
}

fn edge(id: &str, source: &str, target: &str) -> Value {
    json!({"id": id, "source": source, "target": target})
}

// === planning ===

#[test]
fn design_example_plans_in_document_order() {
    let document: Value = serde_json::from_str(LIGHTHOUSE).unwrap();
    let plan = plan(&document).unwrap();
    assert_eq!(plan.name(), "lighthouse reel");
    assert!(plan.options().fail_fast);
    let order: Vec<&str> = plan.steps().iter().map(|s| s.id.as_str()).collect();
    assert_eq!(
        order,
        ["brief", "still", "clip", "voice", "negative", "deliver"]
    );
    assert_eq!(plan.dependencies("deliver"), ["clip", "voice", "negative"]);
    assert_eq!(plan.dependents("still"), ["clip", "negative"]);
    assert_eq!(plan.roots(), ["brief"]);

    let still = plan.step("still").unwrap();
    assert_eq!(still.kind, StepKind::Image);
    assert_eq!(still.produces, Some(ArtifactKind::Image));
    assert_eq!(
        still.inputs,
        [StepInput {
            from: "brief".into(),
            handle: Some("prompt".into()),
            kind: ArtifactKind::Text
        }]
    );
    let requirement = still.requirement.as_ref().unwrap();
    assert_eq!(requirement.service, Service::ComfyUi);
    assert_eq!(requirement.capability, "image");
    assert!(requirement
        .models
        .contains(&"flux1-dev.safetensors".to_owned()));

    let voice = plan.step("voice").unwrap();
    assert_eq!(
        voice.requirement.as_ref().unwrap().capability,
        "narration-visual"
    );
    assert_eq!(voice.inputs[0].handle.as_deref(), Some("media"));
    assert_eq!(
        plan.step("negative").unwrap().inputs[0].handle.as_deref(),
        Some("$input")
    );
    assert!(plan.step("brief").unwrap().runs_in_daemon());
    assert_eq!(plan.step("deliver").unwrap().produces, None);
    assert_eq!(plan.step("deliver").unwrap().inputs.len(), 3);
}

#[test]
fn example_workflows_plan() {
    let two: Value = serde_json::from_str(TWO_BRANCHES).unwrap();
    let plan_two = plan(&two).unwrap();
    assert!(!plan_two.options().fail_fast);
    assert_eq!(plan_two.dependents("brief"), ["wide", "square"]);
    assert_eq!(
        plan_two.step("wide").unwrap().template(),
        Some("flux-txt2img")
    );

    let invert: Value = serde_json::from_str(INVERT).unwrap();
    let plan_invert = plan(&invert).unwrap();
    let step = plan_invert.step("invert").unwrap();
    assert_eq!(step.produces, Some(ArtifactKind::Image));
    let requirement = step.requirement.as_ref().unwrap();
    assert_eq!(requirement.capability, GENERIC_COMFY);
    assert!(requirement.models.is_empty());
}

#[test]
fn ui_fields_are_ignored() {
    let document = json!({
        "nodes": [{"id": "a", "type": "intent", "position": {"x": 1, "y": 2}, "selected": true,
                   "measured": {"width": 10}, "width": 5, "height": 6, "dragging": false,
                   "style": {}, "data": {"prompt": "x", "label": "A", "_ui": 1}}],
        "edges": [],
        "viewport": {"x": 0, "y": 0, "zoom": 1}
    });
    let plan = plan(&document).unwrap();
    assert_eq!(plan.name(), "untitled");
}

#[test]
fn expanded_intent_needs_langflow() {
    let document = doc(
        json!([{"id": "a", "type": "intent", "data": {"prompt": "x", "expand": true}}]),
        json!([]),
    );
    let plan = plan(&document).unwrap();
    let requirement = plan.step("a").unwrap().requirement.clone().unwrap();
    assert_eq!(requirement.service, Service::LangFlow);
    assert_eq!(requirement.capability, PROMPT_EXPANSION_FLOW);
}

// === validation, one issue kind at a time ===

#[test]
fn duplicate_ids() {
    let issue = only(
        doc(json!([intent("a"), intent("a")]), json!([])),
        codes::DUPLICATE_NODE_ID,
    );
    assert_eq!(issue.node.as_deref(), Some("a"));

    let document = doc(
        json!([intent("a"), image("b"), image("c")]),
        json!([edge("e", "a", "b"), edge("e", "a", "c")]),
    );
    let issue = only(document, codes::DUPLICATE_EDGE_ID);
    assert_eq!(issue.edge.as_deref(), Some("e"));
}

#[test]
fn edge_to_missing_node() {
    let issue = only(
        doc(json!([intent("a")]), json!([edge("e1", "a", "ghost")])),
        codes::MISSING_NODE,
    );
    assert_eq!(issue.edge.as_deref(), Some("e1"));
    assert_eq!(issue.field.as_deref(), Some("target"));
    assert!(issue.message.contains("ghost"));
}

/// A comfyui step with two unpinned image bindings: an image edge must say which.
fn two_image_slots() -> Value {
    json!({"id": "mix", "type": "comfyui", "data": {
        "workflow": {
            "1": {"class_type": "LoadImage", "inputs": {"image": "$a"}},
            "2": {"class_type": "LoadImage", "inputs": {"image": "$b"}},
            "3": {"class_type": "ImageBlend", "inputs": {"image1": ["1", 0], "image2": ["2", 0],
                  "blend_factor": 0.5, "blend_mode": "normal"}},
            "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0],
                  "filename_prefix": "mix"}}},
        "bindings": {"$a": {"kind": "image"}, "$b": {"kind": "image"}}}})
}

#[test]
fn handles_pick_among_inputs_of_one_kind() {
    let nodes = json!([intent("t"), image("p"), image("q"), two_image_slots()]);
    let edges = json!([edge("e1", "t", "p"), edge("e2", "t", "q"),
        {"id": "e3", "source": "p", "target": "mix", "targetHandle": "$a"},
        {"id": "e4", "source": "q", "target": "mix", "targetHandle": "b"}]);
    let plan = plan(&doc(nodes.clone(), edges)).unwrap();
    let handles: Vec<_> = plan
        .step("mix")
        .unwrap()
        .inputs
        .iter()
        .map(|i| i.handle.clone().unwrap())
        .collect();
    assert_eq!(handles, ["$a", "$b"]);

    let edges = json!([edge("e1", "t", "p"), edge("e2", "t", "q"), edge("e3", "p", "mix"),
        {"id": "e4", "source": "q", "target": "mix", "targetHandle": "$b"}]);
    let issue = only(doc(nodes.clone(), edges), codes::MISSING_HANDLE);
    assert_eq!(issue.edge.as_deref(), Some("e3"));
    assert_eq!(issue.node.as_deref(), Some("mix"));
    assert_eq!(issue.field.as_deref(), Some("targetHandle"));

    let edges = json!([edge("e1", "t", "p"), edge("e2", "t", "q"),
        {"id": "e3", "source": "p", "target": "mix", "targetHandle": "image"},
        {"id": "e4", "source": "q", "target": "mix", "targetHandle": "$b"}]);
    let issue = only(doc(nodes.clone(), edges), codes::AMBIGUOUS_HANDLE);
    assert_eq!(issue.edge.as_deref(), Some("e3"));

    let edges = json!([edge("e1", "t", "p"), edge("e2", "t", "q"),
        {"id": "e3", "source": "p", "target": "mix", "targetHandle": "$c"},
        {"id": "e4", "source": "q", "target": "mix", "targetHandle": "$b",
         "sourceHandle": "left"}]);
    let all = issues(doc(nodes, edges));
    let unknown: Vec<_> = all
        .iter()
        .filter(|i| i.code == codes::UNKNOWN_HANDLE)
        .collect();
    assert_eq!(unknown.len(), 2, "{all:#?}");
    assert_eq!(unknown[0].field.as_deref(), Some("targetHandle"));
    assert_eq!(unknown[1].field.as_deref(), Some("sourceHandle"));
    // $a got nothing once e3 was refused.
    assert!(all
        .iter()
        .any(|i| i.code == codes::MISSING_INPUT && i.field.as_deref() == Some("data.bindings.$a")));
}

#[test]
fn cycle_names_a_node_on_it() {
    let nodes = json!([intent("t"), image("a"),
        {"id": "b", "type": "comfyui", "data": {"template": "invert-image"}},
        {"id": "c", "type": "comfyui", "data": {"template": "invert-image"}}]);
    let edges = json!([
        edge("e1", "t", "a"),
        edge("e2", "b", "c"),
        edge("e3", "c", "b")
    ]);
    let all = issues(doc(nodes, edges));
    let cycle: Vec<_> = all.iter().filter(|i| i.code == codes::CYCLE).collect();
    assert_eq!(cycle.len(), 1, "{all:#?}");
    assert_eq!(cycle[0].node.as_deref(), Some("b"));
    assert!(cycle[0].message.contains("'c'"));

    let self_loop = doc(
        json!([intent("t"), image("a")]),
        json!([edge("e1", "t", "a"),
        {"id": "e2", "source": "a", "target": "a", "targetHandle": "prompt"}]),
    );
    let all = issues(self_loop);
    assert!(all
        .iter()
        .any(|i| i.code == codes::CYCLE && i.node.as_deref() == Some("a")));
}

#[test]
fn unknown_type() {
    let issue = only(
        doc(json!([{"id": "a", "type": "sound", "data": {}}]), json!([])),
        codes::UNKNOWN_TYPE,
    );
    assert_eq!(issue.node.as_deref(), Some("a"));
    assert_eq!(issue.field.as_deref(), Some("type"));
    assert!(issue.message.contains("sound"));
}

#[test]
fn missing_and_invalid_parameters() {
    let issue = only(
        doc(
            json!([{"id": "a", "type": "intent", "data": {}}]),
            json!([]),
        ),
        codes::MISSING_PARAMETER,
    );
    assert_eq!(issue.field.as_deref(), Some("data.prompt"));

    let bad = json!({"id": "s", "type": "image",
        "data": {"prompt": "x", "steps": 0, "width": 1020, "seed": "seven", "guidance": 3}});
    let all = issues(doc(json!([bad]), json!([])));
    // Issues follow the order of the step's data, which depends on whether serde_json keeps
    // insertion order (a feature another crate of the workspace may switch on): compare sorted.
    let mut fields: Vec<_> = all
        .iter()
        .filter(|i| i.code == codes::INVALID_PARAMETER)
        .map(|i| i.field.clone().unwrap())
        .collect();
    fields.sort();
    assert_eq!(
        fields,
        ["data.seed", "data.steps", "data.width"],
        "{all:#?}"
    );
    let steps = all
        .iter()
        .find(|i| i.field.as_deref() == Some("data.steps"))
        .unwrap();
    assert!(
        steps.message.contains("between 1 and 1000"),
        "{}",
        steps.message
    );
    let width = all
        .iter()
        .find(|i| i.field.as_deref() == Some("data.width"))
        .unwrap();
    assert!(
        width.message.contains("multiple of 16"),
        "{}",
        width.message
    );

    let issue = only(
        doc(
            json!([{"id": "n", "type": "narration", "data": {"mode": "sung"}}]),
            json!([]),
        ),
        codes::INVALID_PARAMETER,
    );
    assert_eq!(issue.field.as_deref(), Some("data.mode"));

    let issue = only(
        doc(
            json!([{"id": "s", "type": "image", "data": {"prompt": "x",
        "stpes": 3}}]),
            json!([]),
        ),
        codes::UNKNOWN_PARAMETER,
    );
    assert_eq!(issue.field.as_deref(), Some("data.stpes"));
}

#[test]
fn image_without_prompt_or_text_input() {
    let issue = only(doc(json!([image("s")]), json!([])), codes::MISSING_INPUT);
    assert_eq!(issue.node.as_deref(), Some("s"));
    assert_eq!(issue.field.as_deref(), Some("data.prompt"));
    // A literal prompt stands in for the upstream text.
    let document = doc(
        json!([{"id": "s", "type": "image", "data": {"prompt": "x"}}]),
        json!([]),
    );
    assert!(plan(&document).is_ok());
}

#[test]
fn wrong_input_kind_and_missing_input() {
    let video = json!({"id": "v", "type": "video", "data": {}});
    let issue = only(
        doc(
            json!([intent("t"), video.clone(), image("s")]),
            json!([edge("e1", "t", "s"), {"id": "e2", "source": "t", "target": "v",
        "targetHandle": "image"}]),
        ),
        codes::WRONG_INPUT_KIND,
    );
    assert_eq!(issue.edge.as_deref(), Some("e2"));
    assert!(issue.message.contains("text"), "{}", issue.message);

    let issue = only(doc(json!([video]), json!([])), codes::MISSING_INPUT);
    assert_eq!(issue.field.as_deref(), Some("data.image"));
    assert!(issue.message.contains("image"));

    // Text into visual narration lands on its optional context input; text into an output's
    // single text narration is fine; text into an image-only generic step is not.
    let document = doc(
        json!([intent("t"), {"id": "x", "type": "comfyui",
        "data": {"template": "invert-image"}}]),
        json!([edge("e1", "t", "x")]),
    );
    let issue = only(document, codes::WRONG_INPUT_KIND);
    assert_eq!(issue.field.as_deref(), Some("target"));
}

#[test]
fn too_many_inputs() {
    let narration = json!({"id": "n", "type": "narration", "data": {"mode": "text"}});
    let issue = only(
        doc(
            json!([intent("a"), intent("b"), narration]),
            json!([edge("e1", "a", "n"), edge("e2", "b", "n")]),
        ),
        codes::TOO_MANY_INPUTS,
    );
    assert_eq!(issue.node.as_deref(), Some("n"));

    let issue = only(
        doc(
            json!([intent("a"), intent("b")]),
            json!([edge("e1", "a", "b")]),
        ),
        codes::TOO_MANY_INPUTS,
    );
    assert_eq!(issue.edge.as_deref(), Some("e1"));
}

#[test]
fn output_produces_nothing() {
    let out = json!({"id": "o", "type": "output"});
    let issue = only(
        doc(
            json!([intent("a"), out, {"id": "o2", "type": "output"}]),
            json!([edge("e1", "a", "o"), edge("e2", "o", "o2")]),
        ),
        codes::NO_OUTPUT,
    );
    assert_eq!(issue.edge.as_deref(), Some("e2"));
}

#[test]
fn unknown_template() {
    let issue = only(
        doc(
            json!([{"id": "s", "type": "image",
        "data": {"template": "sdxl", "prompt": "x"}}]),
            json!([]),
        ),
        codes::UNKNOWN_TEMPLATE,
    );
    assert_eq!(issue.field.as_deref(), Some("data.template"));
    assert!(
        issue.message.contains("flux-txt2img"),
        "lists known: {}",
        issue.message
    );

    let issue = only(
        doc(
            json!([{"id": "s", "type": "image",
        "data": {"template": "wan21-i2v", "prompt": "x"}}]),
            json!([]),
        ),
        codes::INVALID_PARAMETER,
    );
    assert!(
        issue.message.contains("video template"),
        "{}",
        issue.message
    );
}

#[test]
fn no_capable_node() {
    // Only box3 serves LangFlow, and no alias "poetry" exists anywhere.
    let document = doc(
        json!([intent("t"), {"id": "l", "type": "langflow",
        "data": {"flow": "poetry"}}]),
        json!([edge("e1", "t", "l")]),
    );
    let issue = only(document, codes::NO_CAPABLE_NODE);
    assert_eq!(issue.node.as_deref(), Some("l"));
    assert!(issue.message.contains("poetry"));

    // A cluster without a video box refuses video steps.
    let cluster: ClusterConfig = serde_json::from_value(json!({
        "default_image_template": "flux-txt2img", "default_video_template": "wan21-i2v",
        "nodes": [{"name": "b", "gpus": [{"model": "x", "vram_mb": 8000}],
                   "comfyui": {"url": "http://h:1", "capabilities": ["image", "video"]}}]}))
    .unwrap();
    let small = Catalog::new(&cluster, TemplateLibrary::builtin().unwrap());
    let document: Value = serde_json::from_str(LIGHTHOUSE).unwrap();
    let all = plan_workflow(&document, &small).unwrap_err();
    let nodes: Vec<_> = all
        .iter()
        .filter(|i| i.code == codes::NO_CAPABLE_NODE)
        .map(|i| i.node.clone().unwrap())
        .collect();
    assert_eq!(nodes, ["still", "clip", "voice"], "{all:#?}");
}

#[test]
fn ui_format_comfy_workflow_is_explained() {
    let ui_export = json!({"last_node_id": 9, "last_link_id": 9,
        "nodes": [{"id": 1, "type": "LoadImage", "widgets_values": ["a.png"]}],
        "links": [[1, 1, 0, 2, 0, "IMAGE"]], "version": 0.4});
    let document = doc(
        json!([{"id": "c", "type": "comfyui", "data": {"workflow": ui_export}}]),
        json!([]),
    );
    let issue = only(document, codes::INVALID_WORKFLOW);
    assert_eq!(issue.node.as_deref(), Some("c"));
    assert_eq!(issue.field.as_deref(), Some("data.workflow"));
    assert!(issue.message.contains("UI-format") && issue.message.contains("API"));
}

#[test]
fn bindings_must_match_placeholders_and_sources() {
    let comfy = |bindings: Value| {
        json!({"id": "c", "type": "comfyui", "data": {
        "workflow": {"1": {"class_type": "LoadImage", "inputs": {"image": "$input"}},
                     "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0],
                           "filename_prefix": "x"}}},
        "bindings": bindings}})
    };
    let still = json!({"id": "s", "type": "image", "data": {"prompt": "x"}});
    let other = json!({"id": "o", "type": "image", "data": {"prompt": "y"}});

    let issue = only(
        doc(json!([comfy(json!({}))]), json!([])),
        codes::MISSING_PARAMETER,
    );
    assert_eq!(issue.field.as_deref(), Some("data.bindings.$input"));

    let all = issues(doc(
        json!([
            still.clone(),
            comfy(json!({"$input": {"from": "s"},
        "$extra": {"from": "s"}}))
        ]),
        json!([edge("e1", "s", "c")]),
    ));
    assert!(
        all.iter()
            .any(|i| i.field.as_deref() == Some("data.bindings.$extra")),
        "{all:#?}"
    );

    let issue = only(
        doc(
            json!([
                still.clone(),
                other.clone(),
                comfy(json!({"$input": {"from": "s"}}))
            ]),
            json!([edge("e1", "s", "c"), {"id": "e2", "source": "o", "target": "c",
        "targetHandle": "$input"}]),
        ),
        codes::BINDING_SOURCE_MISMATCH,
    );
    assert_eq!(issue.edge.as_deref(), Some("e2"));

    let issue = only(
        doc(
            json!([still.clone(), comfy(json!({"$input": {"from": "s"}}))]),
            json!([]),
        ),
        codes::MISSING_INPUT,
    );
    assert!(
        issue.message.contains("no edge connects 's'"),
        "{}",
        issue.message
    );

    let issue = only(
        doc(
            json!([comfy(json!({"$input": {"from": "nobody"}}))]),
            json!([]),
        ),
        codes::MISSING_NODE,
    );
    assert_eq!(issue.field.as_deref(), Some("data.bindings.$input.from"));
}

#[test]
fn every_problem_at_once() {
    let document = json!({
        "name": "broken",
        "nodes": [
            intent("t"),
            {"id": "s", "type": "image", "data": {"steps": 5000}},
            {"id": "v", "type": "video", "data": {"fps": "fast"}},
            {"id": "x", "type": "teleport"},
            intent("t"),
        ],
        "edges": [edge("e1", "t", "s"), edge("e2", "t", "ghost")]
    });
    let all = issues(document);
    let mut found: Vec<&str> = all.iter().map(|i| i.code.as_str()).collect();
    found.sort_unstable();
    assert_eq!(
        found,
        [
            codes::DUPLICATE_NODE_ID,
            codes::INVALID_PARAMETER,
            codes::INVALID_PARAMETER,
            codes::MISSING_INPUT,
            codes::MISSING_NODE,
            codes::UNKNOWN_TYPE,
        ],
        "{all:#?}"
    );
}

#[test]
fn invalid_documents() {
    for (document, field) in [
        (json!(null), None),
        (json!("workflow"), None),
        (json!({"name": "x"}), Some("nodes")),
        (json!({"nodes": {}}), Some("nodes")),
        (json!({"nodes": []}), Some("nodes")),
        (json!({"name": 5, "nodes": [intent("a")]}), Some("name")),
        (
            json!({"nodes": [intent("a")], "options": {"fail_fast": "no"}}),
            Some("options"),
        ),
        (json!({"nodes": [intent("a")], "edges": 3}), Some("edges")),
        (
            json!({"nodes": [{"id": 1, "type": "intent"}]}),
            Some("nodes[0].id"),
        ),
        (json!({"nodes": [7]}), Some("nodes[0]")),
    ] {
        let all = issues(document.clone());
        assert!(
            all.iter()
                .any(|i| i.code == codes::INVALID_DOCUMENT && i.field.as_deref() == field),
            "{document} -> {all:#?}"
        );
    }
}

/// Odd JSON anywhere must produce issues, never a panic.
#[test]
fn odd_json_never_panics() {
    let odd_values = [
        json!(null),
        json!(0),
        json!(-1.5e300),
        json!(""),
        json!([]),
        json!({}),
        json!([[[[null]]]]),
        json!({"a": {"b": {"c": [1, "2", null]}}}),
        json!(u64::MAX),
        json!("$input"),
    ];
    let mut documents = Vec::new();
    for odd in &odd_values {
        documents.push(odd.clone());
        documents.push(json!({"name": odd, "nodes": odd, "edges": odd, "options": odd}));
        documents.push(json!({"nodes": [{"id": odd, "type": odd, "data": odd}]}));
        documents.push(json!({"nodes": [odd], "edges": [odd]}));
        documents.push(json!({"nodes": [intent("a")], "options": {"retry": odd}}));
        documents.push(json!({"nodes": [{"id": "n", "type": "langflow",
            "data": {"flow": "f", "retry": {"attempts": odd, "backoff_ms": odd, "x": odd}}}],
            "options": {"retry": {"attempts": odd, "backoff_ms": odd, "x": odd}}}));
        for kind in StepKind::ALL {
            documents.push(
                json!({"nodes": [intent("t"), {"id": "n", "type": kind.as_str(),
                "data": {"prompt": odd, "template": odd, "width": odd, "steps": odd,
                         "mode": odd, "flow": odd, "workflow": odd, "bindings": odd,
                         "parameters": odd, "tweaks": odd, "input": odd, "output": odd,
                         "expand": odd, "seed": odd, "retry": odd}}],
                "edges": [{"id": "e", "source": "t", "target": "n", "sourceHandle": odd,
                           "targetHandle": odd}, {"id": odd, "source": odd, "target": odd}]}),
            );
            documents.push(
                json!({"nodes": [{"id": "n", "type": kind.as_str(), "data": {
                "workflow": {"1": odd, "2": {"class_type": odd, "inputs": odd}},
                "bindings": {"$x": odd, "y": {"from": odd, "kind": odd}}}}]}),
            );
        }
    }
    for document in documents {
        // Either outcome is fine; reaching the next line is the test.
        let _ = plan(&document);
    }
}

// === retry policies ===

/// A document whose step `n`, of type `kind`, plans cleanly once `data` holds `retry`
/// (`null`: none). Upstream steps feed the inputs `n` needs.
fn retry_doc(kind: StepKind, retry: Value, options: Value) -> Value {
    let mut data = match kind {
        StepKind::Intent => json!({"prompt": "x", "expand": true}),
        StepKind::Image => json!({"prompt": "x"}),
        StepKind::Video | StepKind::Output => json!({}),
        StepKind::Narration => json!({"mode": "text"}),
        StepKind::ComfyUi => json!({"template": "invert-image"}),
        StepKind::LangFlow => json!({"flow": "narration-text"}),
    };
    if !retry.is_null() {
        data["retry"] = retry;
    }
    let feed = match kind {
        StepKind::Video | StepKind::ComfyUi => Some("still"),
        StepKind::Narration | StepKind::Output => Some("brief"),
        _ => None,
    };
    let mut nodes = vec![
        intent("brief"),
        json!({"id": "still", "type": "image", "data": {"prompt": "x"}}),
    ];
    nodes.push(json!({"id": "n", "type": kind.as_str(), "data": data}));
    let edges: Vec<Value> = feed.map(|from| edge("e", from, "n")).into_iter().collect();
    json!({"name": "t", "options": options, "nodes": nodes, "edges": edges})
}

/// The step types that run on a node and so take `data.retry`.
const REMOTE_KINDS: [StepKind; 6] = [
    StepKind::Intent,
    StepKind::Image,
    StepKind::Video,
    StepKind::Narration,
    StepKind::ComfyUi,
    StepKind::LangFlow,
];

fn policy(attempts: u32, backoff_ms: u64) -> RetryPolicy {
    RetryPolicy {
        attempts,
        backoff_ms,
    }
}

#[test]
fn retry_default_is_three_attempts_one_second() {
    assert_eq!(RetryPolicy::default(), policy(3, 1000));
    assert_eq!(RunOptions::default().retry, RetryPolicy::default());
    let plan = lighthouse();
    for step in plan.steps() {
        assert_eq!(step.retry(), RetryPolicy::default(), "{}", step.id);
    }
}

#[test]
fn retry_step_value_wins_over_options_over_default() {
    for kind in REMOTE_KINDS {
        // Nothing set: the default.
        let planned = plan(&retry_doc(kind, Value::Null, Value::Null)).unwrap();
        assert_eq!(
            planned.step("n").unwrap().retry(),
            policy(3, 1000),
            "{kind}"
        );

        // Options only: the options' fields, the default for the rest.
        let options = json!({"retry": {"attempts": 5}});
        let planned = plan(&retry_doc(kind, Value::Null, options)).unwrap();
        assert_eq!(planned.options().retry, policy(5, 1000));
        assert_eq!(
            planned.step("n").unwrap().retry(),
            policy(5, 1000),
            "{kind}"
        );

        // Step and options: field by field, the step first.
        let options = json!({"retry": {"attempts": 5, "backoff_ms": 250}});
        let step = json!({"attempts": 1});
        let planned = plan(&retry_doc(kind, step, options)).unwrap();
        assert_eq!(planned.step("n").unwrap().retry(), policy(1, 250), "{kind}");
        // Steps without their own retry keep the run-wide one.
        assert_eq!(planned.step("still").unwrap().retry(), policy(5, 250));

        // Step only.
        let step = json!({"attempts": 10, "backoff_ms": 0});
        let planned = plan(&retry_doc(kind, step, json!({}))).unwrap();
        assert_eq!(planned.step("n").unwrap().retry(), policy(10, 0), "{kind}");

        // Null fields and a null retry mean absent.
        let step = json!({"attempts": null, "backoff_ms": 600000});
        let options = json!({"retry": {"attempts": 2, "backoff_ms": null}});
        let planned = plan(&retry_doc(kind, step, options)).unwrap();
        assert_eq!(
            planned.step("n").unwrap().retry(),
            policy(2, 600_000),
            "{kind}"
        );
        let planned = plan(&retry_doc(kind, json!({}), json!({"retry": null}))).unwrap();
        assert_eq!(
            planned.step("n").unwrap().retry(),
            policy(3, 1000),
            "{kind}"
        );
    }
}

#[test]
fn retry_is_not_a_template_parameter() {
    let document = retry_doc(StepKind::Image, json!({"attempts": 4}), Value::Null);
    let plan = plan(&document).unwrap();
    let job = plan.step("n").unwrap().render(&[], &catalog()).unwrap();
    assert!(!comfy(job).prompt.to_string().contains("attempts"));
}

#[test]
fn retry_in_step_data_is_validated() {
    let cases = [
        (
            json!({"attempts": 0}),
            codes::INVALID_PARAMETER,
            "data.retry.attempts",
        ),
        (
            json!({"attempts": 11}),
            codes::INVALID_PARAMETER,
            "data.retry.attempts",
        ),
        (
            json!({"attempts": -1}),
            codes::INVALID_PARAMETER,
            "data.retry.attempts",
        ),
        (
            json!({"attempts": 2.0}),
            codes::INVALID_PARAMETER,
            "data.retry.attempts",
        ),
        (
            json!({"attempts": "3"}),
            codes::INVALID_PARAMETER,
            "data.retry.attempts",
        ),
        (
            json!({"attempts": u64::MAX}),
            codes::INVALID_PARAMETER,
            "data.retry.attempts",
        ),
        (
            json!({"backoff_ms": 600_001}),
            codes::INVALID_PARAMETER,
            "data.retry.backoff_ms",
        ),
        (
            json!({"backoff_ms": -5}),
            codes::INVALID_PARAMETER,
            "data.retry.backoff_ms",
        ),
        (
            json!({"backoff_ms": [1]}),
            codes::INVALID_PARAMETER,
            "data.retry.backoff_ms",
        ),
        (json!(3), codes::INVALID_PARAMETER, "data.retry"),
        (json!("often"), codes::INVALID_PARAMETER, "data.retry"),
        (json!([3, 1000]), codes::INVALID_PARAMETER, "data.retry"),
        (
            json!({"attempt": 3}),
            codes::UNKNOWN_PARAMETER,
            "data.retry.attempt",
        ),
        (
            json!({"attempts": 2, "jitter": true}),
            codes::UNKNOWN_PARAMETER,
            "data.retry.jitter",
        ),
    ];
    for kind in REMOTE_KINDS {
        for (retry, code, field) in &cases {
            let all = issues(retry_doc(kind, retry.clone(), Value::Null));
            assert_eq!(all.len(), 1, "{kind} {retry}: {all:#?}");
            let issue = &all[0];
            assert_eq!(issue.code, *code, "{kind} {retry}: {issue:#?}");
            assert_eq!(issue.node.as_deref(), Some("n"));
            assert_eq!(issue.field.as_deref(), Some(*field), "{kind} {retry}");
            assert!(issue.message.contains("step 'n'"), "{}", issue.message);
        }
    }
    let issue = only(
        retry_doc(StepKind::Image, json!({"attempts": 0}), Value::Null),
        codes::INVALID_PARAMETER,
    );
    assert!(
        issue.message.contains("between 1 and 10, got the number 0"),
        "{}",
        issue.message
    );
}

#[test]
fn retry_applies_only_where_the_step_runs_on_a_node() {
    // An intent without expansion runs in the daemon: nothing to retry.
    let document = doc(
        json!([{"id": "a", "type": "intent",
                "data": {"prompt": "x", "retry": {"attempts": 2}}}]),
        json!([]),
    );
    let issue = only(document, codes::INVALID_PARAMETER);
    assert_eq!(issue.node.as_deref(), Some("a"));
    assert_eq!(issue.field.as_deref(), Some("data.retry"));
    assert!(issue.message.contains("expand"), "{}", issue.message);

    // An output ignores its data, retry included.
    let document = retry_doc(StepKind::Output, json!({"attempts": 99}), Value::Null);
    let plan = plan(&document).unwrap();
    assert_eq!(plan.step("n").unwrap().retry(), RetryPolicy::default());
}

#[test]
fn retry_in_options_is_validated() {
    let cases = [
        (json!({"attempts": 0}), "options.retry.attempts"),
        (json!({"attempts": 11}), "options.retry.attempts"),
        (json!({"attempts": "3"}), "options.retry.attempts"),
        (json!({"backoff_ms": 600_001}), "options.retry.backoff_ms"),
        (json!({"backoff_ms": 1.5}), "options.retry.backoff_ms"),
        (json!({"backoff": 10}), "options.retry.backoff"),
        (json!(true), "options.retry"),
    ];
    for (retry, field) in cases {
        let options = json!({"fail_fast": false, "retry": retry});
        let all = issues(retry_doc(StepKind::Image, Value::Null, options));
        assert_eq!(all.len(), 1, "{retry}: {all:#?}");
        assert_eq!(all[0].code, codes::INVALID_DOCUMENT);
        assert_eq!(all[0].node, None);
        assert_eq!(all[0].field.as_deref(), Some(field), "{retry}");
        assert!(
            all[0].message.starts_with("options retry"),
            "{}",
            all[0].message
        );
    }

    // Unknown option names are still refused, next to a valid retry.
    let options = json!({"retry": {"attempts": 2}, "fail_fats": false});
    let issue = only(
        retry_doc(StepKind::Image, Value::Null, options),
        codes::INVALID_DOCUMENT,
    );
    assert_eq!(issue.field.as_deref(), Some("options"));

    // Options that are not an object are refused as before.
    let issue = only(
        retry_doc(StepKind::Image, Value::Null, json!([{"retry": 1}])),
        codes::INVALID_DOCUMENT,
    );
    assert_eq!(issue.field.as_deref(), Some("options"));
}

#[test]
fn retry_backoff_doubles_up_to_a_minute() {
    let ms = std::time::Duration::from_millis;
    let retry = RetryPolicy::default();
    assert_eq!(retry.backoff(1), ms(1000));
    assert_eq!(retry.backoff(2), ms(2000));
    assert_eq!(retry.backoff(3), ms(4000));
    assert_eq!(retry.backoff(0), ms(1000));
    assert_eq!(retry.backoff(7), ms(60_000));
    assert_eq!(retry.backoff(u32::MAX), MAX_BACKOFF);
    assert_eq!(policy(3, 0).backoff(9), ms(0));
    assert_eq!(policy(3, 600_000).backoff(1), ms(60_000));
    assert_eq!(policy(3, u64::MAX).backoff(64), ms(60_000));
}

#[test]
fn retry_policy_serializes_and_fills_defaults() {
    let value = serde_json::to_value(policy(4, 500)).unwrap();
    assert_eq!(value, json!({"attempts": 4, "backoff_ms": 500}));
    let read: RetryPolicy = serde_json::from_value(json!({"attempts": 4})).unwrap();
    assert_eq!(read, policy(4, 1000));
    assert!(serde_json::from_value::<RetryPolicy>(json!({"tries": 4})).is_err());
    let options: RunOptions = serde_json::from_value(json!({"retry": {"backoff_ms": 5}})).unwrap();
    assert_eq!(options.retry, policy(3, 5));
    assert!(options.fail_fast);
}

// === rendering ===

fn artifact(from: &str, kind: ArtifactKind, filename: &str, text: Option<&str>) -> InputArtifact {
    InputArtifact {
        from_step: from.to_owned(),
        meta: ArtifactMeta {
            id: format!("{from}0123abcd"),
            kind,
            mime: "application/octet-stream".to_owned(),
            size: 1,
            filename: filename.to_owned(),
        },
        path: PathBuf::from(format!("/data/{from}/{filename}")),
        text: text.map(str::to_owned),
    }
}

fn lighthouse() -> Plan {
    plan(&serde_json::from_str(LIGHTHOUSE).unwrap()).unwrap()
}

fn comfy(job: Job) -> ComfyJob {
    match job {
        Job::Comfy(job) => job,
        other => panic!("expected a ComfyUI job, got {other:?}"),
    }
}

fn langflow(job: Job) -> LangflowJob {
    match job {
        Job::Langflow(job) => job,
        other => panic!("expected a LangFlow job, got {other:?}"),
    }
}

#[test]
fn intent_and_output_run_in_the_daemon() {
    let plan = lighthouse();
    let catalog = catalog();
    let brief = plan.step("brief").unwrap().render(&[], &catalog).unwrap();
    assert_eq!(
        brief,
        Job::Text("a lighthouse at dusk, slow push-in, warm light".into())
    );
    let deliver = plan.step("deliver").unwrap().render(&[], &catalog).unwrap();
    assert_eq!(deliver, Job::Collect);
}

#[test]
fn image_render_injects_parameters_and_upstream_text() {
    // Quotes and a placeholder-looking word in the text must land verbatim in one input.
    let text = "a \"lighthouse\" at $input, dusk";
    let inputs = [artifact(
        "brief",
        ArtifactKind::Text,
        "brief.txt",
        Some(text),
    )];
    let job = comfy(
        lighthouse()
            .step("still")
            .unwrap()
            .render(&inputs, &catalog())
            .unwrap(),
    );
    let prompt = &job.prompt;
    assert_eq!(prompt["6"]["inputs"]["text"], text);
    assert_eq!(prompt["6"]["inputs"]["clip"], json!(["11", 0]));
    assert_eq!(prompt["27"]["inputs"]["width"], 1024);
    assert_eq!(prompt["30"]["inputs"]["width"], 1024);
    assert_eq!(prompt["27"]["inputs"]["height"], 576);
    assert_eq!(prompt["30"]["inputs"]["height"], 576);
    assert_eq!(prompt["17"]["inputs"]["steps"], 20);
    assert_eq!(prompt["25"]["inputs"]["noise_seed"], 7);
    assert_eq!(prompt["26"]["inputs"]["guidance"], 3.5);
    assert!(job.uploads.is_empty());
    assert_eq!(job.output_kind, ArtifactKind::Image);
}

#[test]
fn video_render_uploads_the_image() {
    let inputs = [artifact(
        "still",
        ArtifactKind::Image,
        "ComfyUI_00001_.PNG",
        None,
    )];
    let job = comfy(
        lighthouse()
            .step("clip")
            .unwrap()
            .render(&inputs, &catalog())
            .unwrap(),
    );
    assert_eq!(
        job.uploads,
        [UploadSlot {
            path: PathBuf::from("/data/still/ComfyUI_00001_.PNG"),
            filename: "still0123abcd.png".into(),
            node_id: "52".into(),
            input_name: "image".into(),
        }]
    );
    let prompt = &job.prompt;
    assert_eq!(prompt["52"]["inputs"]["image"], "still0123abcd.png");
    assert_eq!(prompt["50"]["inputs"]["length"], 49);
    assert_eq!(prompt["28"]["inputs"]["fps"], 16);
    assert_eq!(prompt["50"]["inputs"]["width"], 832);
    assert!(prompt["6"]["inputs"]["text"]
        .as_str()
        .is_some_and(|t| !t.is_empty()));
    assert_eq!(job.output_kind, ArtifactKind::Video);

    let missing = lighthouse()
        .step("clip")
        .unwrap()
        .render(&[], &catalog())
        .unwrap_err();
    assert_eq!(
        missing,
        RenderError::MissingInput {
            step: "clip".into(),
            input: "image".into()
        }
    );
}

#[test]
fn inline_binding_becomes_an_upload() {
    let inputs = [artifact("still", ArtifactKind::Image, "a.png", None)];
    let job = comfy(
        lighthouse()
            .step("negative")
            .unwrap()
            .render(&inputs, &catalog())
            .unwrap(),
    );
    assert_eq!(job.uploads.len(), 1);
    assert_eq!(job.uploads[0].node_id, "1");
    assert_eq!(job.uploads[0].input_name, "image");
    assert_eq!(job.prompt["1"]["inputs"]["image"], "still0123abcd.png");
    assert_eq!(job.prompt["2"]["inputs"]["image"], json!(["1", 0]));
    assert_eq!(job.output_kind, ArtifactKind::Image);
}

#[test]
fn text_binding_injects_the_text() {
    let document = doc(
        json!([intent("t"), {"id": "c", "type": "comfyui", "data": {
        "workflow": {
            "1": {"class_type": "CLIPTextEncode", "inputs": {"text": "$words", "clip": ["2", 0]}},
            "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "t5.safetensors",
                  "type": "sd3"}}},
        "bindings": {"$words": {"from": "t", "kind": "text"}}, "output": "data"}}]),
        json!([edge("e1", "t", "c")]),
    );
    let plan = plan(&document).unwrap();
    let step = plan.step("c").unwrap();
    assert_eq!(
        step.requirement.as_ref().unwrap().models,
        ["t5.safetensors"]
    );
    let inputs = [artifact(
        "t",
        ArtifactKind::Text,
        "t.txt",
        Some("hello \"world\""),
    )];
    let job = comfy(step.render(&inputs, &catalog()).unwrap());
    assert_eq!(job.prompt["1"]["inputs"]["text"], "hello \"world\"");
    assert!(job.uploads.is_empty());
    assert_eq!(job.output_kind, ArtifactKind::Data);

    let unloaded = [artifact("t", ArtifactKind::Text, "t.txt", None)];
    let err = step.render(&unloaded, &catalog()).unwrap_err();
    assert_eq!(
        err,
        RenderError::MissingText {
            step: "c".into(),
            from: "t".into()
        }
    );
}

#[test]
fn template_comfy_step_takes_parameters() {
    let document = doc(
        json!([intent("t"), image("s"), {"id": "c", "type": "comfyui",
        "data": {"template": "invert-image", "parameters": {"filename_prefix": "inv"}}}]),
        json!([edge("e1", "t", "s"), edge("e2", "s", "c")]),
    );
    let plan = plan(&document).unwrap();
    let inputs = [artifact("s", ArtifactKind::Image, "x.webp", None)];
    let job = comfy(plan.step("c").unwrap().render(&inputs, &catalog()).unwrap());
    assert_eq!(job.prompt["3"]["inputs"]["filename_prefix"], "inv");
    assert_eq!(job.prompt["1"]["inputs"]["image"], "s0123abcd.webp");
    assert_eq!(job.uploads[0].node_id, "1");

    let bad = doc(
        json!([{"id": "c", "type": "comfyui", "data": {"template": "invert-image",
        "parameters": {"filename_prefix": 3, "zoom": 2}}}]),
        json!([]),
    );
    let all = issues(bad);
    let fields: Vec<_> = all
        .iter()
        .map(|i| (i.code.as_str(), i.field.clone().unwrap()))
        .collect();
    assert!(fields.contains(&(
        codes::INVALID_PARAMETER,
        "data.parameters.filename_prefix".into()
    )));
    assert!(fields.contains(&(codes::UNKNOWN_PARAMETER, "data.parameters.zoom".into())));
}

#[test]
fn narration_renders_langflow_jobs() {
    let video = [artifact("clip", ArtifactKind::Video, "clip.png", None)];
    let job = langflow(
        lighthouse()
            .step("voice")
            .unwrap()
            .render(&video, &catalog())
            .unwrap(),
    );
    assert_eq!(job.flow, "narration-visual");
    assert_eq!(job.files, [PathBuf::from("/data/clip/clip.png")]);
    assert!(!job.input_value.is_empty());

    let document = doc(
        json!([intent("t"), {"id": "n", "type": "narration",
        "data": {"mode": "text", "prompt": "Narrate warmly."}}]),
        json!([edge("e1", "t", "n")]),
    );
    let plan = plan(&document).unwrap();
    let text = [artifact(
        "t",
        ArtifactKind::Text,
        "t.txt",
        Some("a lighthouse"),
    )];
    let job = langflow(plan.step("n").unwrap().render(&text, &catalog()).unwrap());
    assert_eq!(job.flow, "narration-text");
    assert_eq!(job.input_value, "Narrate warmly.\n\na lighthouse");
    assert!(job.files.is_empty());
}

#[test]
fn langflow_step_renders_input_and_tweaks() {
    let document = doc(
        json!([intent("t"), {"id": "l", "type": "langflow", "data": {
        "flow": "narration-text", "input_type": "text", "output_type": "any",
        "tweaks": {"Prompt-1": {"template": "Be brief."}}}}]),
        json!([edge("e1", "t", "l")]),
    );
    let plan = plan(&document).unwrap();
    let text = [artifact("t", ArtifactKind::Text, "t.txt", Some("hello"))];
    let job = langflow(plan.step("l").unwrap().render(&text, &catalog()).unwrap());
    assert_eq!(job.flow, "narration-text");
    assert_eq!(job.input_value, "hello");
    assert_eq!(job.input_type, "text");
    assert_eq!(job.output_type, "any");
    assert_eq!(job.tweaks["Prompt-1"]["template"], "Be brief.");

    let bad = doc(
        json!([{"id": "l", "type": "langflow", "data": {"flow": "narration-text",
        "input_type": "voice", "tweaks": {"A": 1}}}]),
        json!([]),
    );
    let fields: Vec<_> = issues(bad).into_iter().map(|i| i.field.unwrap()).collect();
    assert_eq!(fields, ["data.input_type", "data.tweaks.A"]);
}

#[test]
fn expanded_intent_renders_the_expansion_flow() {
    let document = doc(
        json!([{"id": "a", "type": "intent", "data": {"prompt": "x", "expand": true}}]),
        json!([]),
    );
    let job = langflow(
        plan(&document)
            .unwrap()
            .step("a")
            .unwrap()
            .render(&[], &catalog())
            .unwrap(),
    );
    assert_eq!(job.flow, PROMPT_EXPANSION_FLOW);
    assert_eq!(job.input_value, "x");
}

#[test]
fn render_names_a_template_that_went_away() {
    let plan = lighthouse();
    let empty: ClusterConfig = serde_json::from_value(json!({
        "default_image_template": "a", "default_video_template": "b", "nodes": []}))
    .unwrap();
    let bare = Catalog::new(&empty, TemplateLibrary::default());
    let inputs = [artifact("brief", ArtifactKind::Text, "b.txt", Some("x"))];
    let err = plan
        .step("still")
        .unwrap()
        .render(&inputs, &bare)
        .unwrap_err();
    assert_eq!(
        err,
        RenderError::UnknownTemplate {
            step: "still".into(),
            template: "flux-txt2img".into()
        }
    );
}

#[test]
fn issues_serialize_for_the_api() {
    let issue = only(
        doc(json!([intent("a"), intent("a")]), json!([])),
        codes::DUPLICATE_NODE_ID,
    );
    let value = serde_json::to_value(&issue).unwrap();
    assert_eq!(value["code"], "duplicate_node_id");
    assert_eq!(value["node"], "a");
    assert_eq!(value["edge"], Value::Null);
    let kind = serde_json::to_value(StepKind::ComfyUi).unwrap();
    assert_eq!(kind, "comfyui");
}

#[test]
fn the_default_step_limit_takes_500_steps_and_refuses_501() {
    let limit = crate::config::DEFAULT_MAX_STEPS;
    assert_eq!(catalog().max_steps(), limit);
    let nodes =
        |count: usize| -> Vec<Value> { (0..count).map(|i| intent(&format!("s{i}"))).collect() };
    plan(&doc(json!(nodes(limit)), json!([]))).expect("500 steps plan");
    let issue = only(
        doc(json!(nodes(limit + 1)), json!([])),
        codes::TOO_MANY_STEPS,
    );
    assert_eq!(issue.field.as_deref(), Some("nodes"));
    assert!(issue.message.contains("has 501 steps"), "{}", issue.message);
}
