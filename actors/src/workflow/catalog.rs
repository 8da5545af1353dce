//! What the cluster offers, and what a step needs from it.
//!
//! Planning checks every step against the configured nodes so that a workflow no box can run
//! is refused at submission, not left queued forever. The same [`Requirement`] then travels
//! with the task to the scheduler, which picks among the nodes that satisfy it.

use serde::{Deserialize, Serialize};

use super::template::TemplateLibrary;
use crate::config::{ClusterConfig, NodeConfig};

/// The cluster's nodes and templates, as planning and rendering see them. Built once at start
/// (and again when the configuration is reloaded).
#[derive(Debug, Clone)]
pub struct Catalog {
    nodes: Vec<NodeConfig>,
    default_image_template: String,
    default_video_template: String,
    templates: TemplateLibrary,
    max_steps: usize,
}

impl Catalog {
    pub fn new(cluster: &ClusterConfig, templates: TemplateLibrary) -> Catalog {
        Catalog {
            nodes: cluster.nodes.clone(),
            default_image_template: cluster.default_image_template.clone(),
            default_video_template: cluster.default_video_template.clone(),
            templates,
            max_steps: cluster.max_steps,
        }
    }

    pub fn templates(&self) -> &TemplateLibrary {
        &self.templates
    }

    pub fn nodes(&self) -> &[NodeConfig] {
        &self.nodes
    }

    /// The template `image` steps use when they name none.
    pub fn default_image_template(&self) -> &str {
        &self.default_image_template
    }

    /// The template `video` steps use when they name none.
    pub fn default_video_template(&self) -> &str {
        &self.default_video_template
    }

    /// Most steps a workflow may have (`[daemon] max_steps`).
    pub fn max_steps(&self) -> usize {
        self.max_steps
    }

    /// Whether some configured node could run a step with this requirement.
    pub fn can_run(&self, requirement: &Requirement) -> bool {
        self.nodes.iter().any(|node| requirement.satisfied_by(node))
    }
}

/// The service a task runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Service {
    #[serde(rename = "comfyui")]
    ComfyUi,
    #[serde(rename = "langflow")]
    LangFlow,
}

impl std::fmt::Display for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Service::ComfyUi => "ComfyUI",
            Service::LangFlow => "LangFlow",
        })
    }
}

/// The capability every ComfyUI node has: running any API-format graph.
pub const GENERIC_COMFY: &str = "comfyui";

/// What a task needs from the node that runs it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Requirement {
    pub service: Service,
    /// For ComfyUI: `image`, `video`, or `comfyui` (any node). For LangFlow: the flow alias
    /// (`narration-text`, `narration-visual`, `prompt-expansion` or a step's own alias).
    pub capability: String,
    /// Model files the job loads, for placement (a node that has them loaded is preferred).
    pub models: Vec<String>,
    /// VRAM estimate in MiB.
    pub vram_mb: u64,
}

impl Requirement {
    /// Whether `node` could run the task at all (health and load aside).
    ///
    /// ComfyUI: the node runs ComfyUI, lists the capability (any ComfyUI node has
    /// `comfyui`), and, when its GPUs are listed, one card has the VRAM. A node without listed
    /// GPUs (a simulator, a box described loosely) is not ruled out on VRAM. Models are not
    /// checked: a node's model list is a placement preference, not an inventory.
    ///
    /// LangFlow: the node runs LangFlow and serves a flow under the capability's alias.
    pub fn satisfied_by(&self, node: &NodeConfig) -> bool {
        match self.service {
            Service::ComfyUi => {
                let Some(comfy) = &node.comfyui else {
                    return false;
                };
                let capable = self.capability == GENERIC_COMFY
                    || comfy.capabilities.contains(&self.capability);
                let fits = node.gpus.is_empty() || node.max_card_vram_mb() >= self.vram_mb;
                capable && fits
            }
            Service::LangFlow => node
                .langflow
                .as_ref()
                .is_some_and(|langflow| langflow.flows.contains_key(&self.capability)),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn comfy_node(caps: &[&str], vram: Option<u64>) -> NodeConfig {
        let gpus: Vec<_> = vram
            .map(|vram_mb| json!({"model": "card", "vram_mb": vram_mb}))
            .into_iter()
            .collect();
        serde_json::from_value(json!({
            "name": "box",
            "gpus": gpus,
            "comfyui": {"url": "http://127.0.0.1:8188", "capabilities": caps},
        }))
        .unwrap()
    }

    fn requirement(service: Service, capability: &str, vram_mb: u64) -> Requirement {
        Requirement {
            service,
            capability: capability.into(),
            models: vec![],
            vram_mb,
        }
    }

    #[test]
    fn comfy_capability_and_vram() {
        let image = requirement(Service::ComfyUi, "image", 20_000);
        assert!(image.satisfied_by(&comfy_node(&["image"], Some(24_000))));
        assert!(!image.satisfied_by(&comfy_node(&["image"], Some(12_000))));
        assert!(!image.satisfied_by(&comfy_node(&["video"], Some(48_000))));
        assert!(image.satisfied_by(&comfy_node(&["image"], None)));
        let generic = requirement(Service::ComfyUi, GENERIC_COMFY, 0);
        assert!(generic.satisfied_by(&comfy_node(&[], Some(8_000))));
        assert!(!requirement(Service::LangFlow, "x", 0).satisfied_by(&comfy_node(&[], None)));
    }

    #[test]
    fn langflow_needs_the_flow_alias() {
        let node: NodeConfig = serde_json::from_value(json!({
            "name": "llm",
            "langflow": {"url": "http://127.0.0.1:7860", "flows": {"narration-text": {"id": "a"}}},
        }))
        .unwrap();
        assert!(requirement(Service::LangFlow, "narration-text", 0).satisfied_by(&node));
        assert!(!requirement(Service::LangFlow, "narration-visual", 0).satisfied_by(&node));
        assert!(!requirement(Service::ComfyUi, GENERIC_COMFY, 0).satisfied_by(&node));
    }

    #[test]
    fn service_serde_names() {
        assert_eq!(
            serde_json::to_string(&Service::ComfyUi).unwrap(),
            "\"comfyui\""
        );
        assert_eq!(
            serde_json::to_string(&Service::LangFlow).unwrap(),
            "\"langflow\""
        );
    }
}
