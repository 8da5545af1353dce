//! Planning: from a checked document to the DAG a `WorkflowRun` walks.
//!
//! Checks run in layers (document shape, each node alone, each edge, the graph as a whole) and
//! all of them run even when an earlier one failed, so one submission reports everything. A
//! node too broken to know its inputs is left out of the edge checks rather than drowning the
//! real problem in follow-on errors.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};

use petgraph::algo::tarjan_scc;
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::Direction;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::catalog::{Catalog, Requirement, Service};
use super::depth;
use super::document::{self, RawEdge};
use super::issue::{codes, Issues, ValidationIssue};
use super::retry::RetryPolicy;
use super::step::{self, Port, StepDraft, StepKind, StepSpec};
use crate::artifact::ArtifactKind;

/// How a run behaves, from the document's `options`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunOptions {
    /// Stop starting new steps once one step fails (running ones finish). When false,
    /// independent branches continue and only the failed step's dependents are skipped.
    pub fail_fast: bool,
    /// The retry policy of every remote step that sets no `data.retry` of its own, field by
    /// field: a step giving only `attempts` takes `backoff_ms` from here.
    pub retry: RetryPolicy,
}

impl Default for RunOptions {
    fn default() -> RunOptions {
        RunOptions {
            fail_fast: true,
            retry: RetryPolicy::default(),
        }
    }
}

/// One artifact a step consumes: from which step, on which of its inputs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepInput {
    /// The upstream step id.
    pub from: String,
    /// The input (handle) of this step it lands on.
    pub handle: Option<String>,
    /// What the upstream step produces.
    pub kind: ArtifactKind,
}

/// A step of the plan, with everything needed to schedule and render it.
#[derive(Debug, Clone)]
pub struct PlannedStep {
    pub id: String,
    pub kind: StepKind,
    pub inputs: Vec<StepInput>,
    /// `None` for `output` steps.
    pub produces: Option<ArtifactKind>,
    /// `None` when the step runs inside the daemon (an intent without expansion, output).
    pub requirement: Option<Requirement>,
    pub(crate) spec: StepSpec,
    /// Resolved when planning: `data.retry`, else `options.retry`, else the default.
    retry: RetryPolicy,
}

impl PlannedStep {
    /// Whether the daemon does the step itself, without a node.
    pub fn runs_in_daemon(&self) -> bool {
        self.requirement.is_none()
    }

    /// How the step is retried: each field from the step's `data.retry`, else from the
    /// document's `options.retry`, else from [`RetryPolicy::default`]. Only meaningful for
    /// steps that run on a node; a daemon step gets the run-wide policy.
    pub fn retry(&self) -> RetryPolicy {
        self.retry
    }

    /// The ComfyUI template the step renders from, if any.
    pub fn template(&self) -> Option<&str> {
        match &self.spec {
            StepSpec::Comfy(spec) => spec.template.as_deref(),
            _ => None,
        }
    }
}

/// A validated workflow: its steps in a topological order and the DAG between them.
#[derive(Debug, Clone)]
pub struct Plan {
    name: String,
    options: RunOptions,
    /// In topological order; `graph` node index `i` is `steps[i]`.
    steps: Vec<PlannedStep>,
    by_id: HashMap<String, usize>,
    graph: DiGraph<usize, ()>,
}

impl Plan {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn options(&self) -> &RunOptions {
        &self.options
    }

    /// All steps, each after every step it depends on.
    pub fn steps(&self) -> &[PlannedStep] {
        &self.steps
    }

    pub fn step(&self, id: &str) -> Option<&PlannedStep> {
        self.by_id.get(id).map(|&index| &self.steps[index])
    }

    /// The ids of the steps `id` consumes from, in plan order, each once.
    pub fn dependencies(&self, id: &str) -> Vec<&str> {
        self.neighbours(id, Direction::Incoming)
    }

    /// The ids of the steps that consume from `id`, in plan order, each once.
    pub fn dependents(&self, id: &str) -> Vec<&str> {
        self.neighbours(id, Direction::Outgoing)
    }

    /// The steps with no dependencies: where a run starts.
    pub fn roots(&self) -> Vec<&str> {
        let steps = self.steps.iter();
        steps
            .filter(|s| s.inputs.is_empty())
            .map(|s| s.id.as_str())
            .collect()
    }

    /// The underlying DAG; node weights index [`Plan::steps`].
    pub fn graph(&self) -> &DiGraph<usize, ()> {
        &self.graph
    }

    fn neighbours(&self, id: &str, direction: Direction) -> Vec<&str> {
        let Some(&index) = self.by_id.get(id) else {
            return Vec::new();
        };
        let mut found: Vec<usize> = self
            .graph
            .neighbors_directed(NodeIndex::new(index), direction)
            .map(|node| self.graph[node])
            .collect();
        found.sort_unstable();
        found.dedup();
        found
            .into_iter()
            .map(|i| self.steps[i].id.as_str())
            .collect()
    }
}

/// A node that passed the per-node checks (or not: `draft` is `None` then).
struct Node {
    id: String,
    draft: Option<StepDraft>,
}

/// An edge between two existing nodes, with the inputs it was resolved to.
struct Link {
    source: usize,
    target: usize,
    /// Ports of the target the edge feeds (several when one source is bound twice).
    ports: Vec<usize>,
}

pub(crate) fn plan(document: &Value, catalog: &Catalog) -> Result<Plan, Vec<ValidationIssue>> {
    let mut issues = Issues::default();
    // Depth first, and alone: a document that could not be stored is not worth reading.
    if !depth::check(document, &mut issues) {
        return Err(issues.into_vec());
    }
    // Size next, and alone too: every step of a huge document would be checked for nothing,
    // and its issues would fill the answer.
    if let Some(nodes) = document.get("nodes").and_then(Value::as_array) {
        let limit = catalog.max_steps();
        if nodes.len() > limit {
            let message = format!(
                "the workflow has {} steps; this daemon takes at most {limit} \
                 ([daemon] max_steps)",
                nodes.len()
            );
            issues.document_field(codes::TOO_MANY_STEPS, "nodes", message);
            return Err(issues.into_vec());
        }
    }
    let Some(doc) = document::read(document, &mut issues) else {
        return Err(issues.into_vec());
    };

    // Nodes, each on its own.
    let mut nodes: Vec<Node> = Vec::with_capacity(doc.nodes.len());
    let mut by_id: HashMap<String, usize> = HashMap::new();
    for raw in &doc.nodes {
        if by_id.contains_key(&raw.id) {
            let message = format!("node id '{}' is used by more than one node", raw.id);
            issues.node(codes::DUPLICATE_NODE_ID, &raw.id, Some("id"), message);
            continue;
        }
        let draft = raw
            .kind
            .as_deref()
            .and_then(|name| match StepKind::parse(name) {
                Some(kind) => step::read(&raw.id, kind, &raw.data, catalog, &mut issues),
                None => {
                    let known: Vec<&str> = StepKind::ALL.iter().map(|k| k.as_str()).collect();
                    let message = format!(
                        "node '{}' has unknown type {name:?} (known: {})",
                        raw.id,
                        known.join(", ")
                    );
                    issues.node(codes::UNKNOWN_TYPE, &raw.id, Some("type"), message);
                    None
                }
            });
        if let Some(requirement) = draft.as_ref().and_then(|d| d.requirement.as_ref()) {
            check_capable(&raw.id, requirement, catalog, &mut issues);
        }
        by_id.insert(raw.id.clone(), nodes.len());
        nodes.push(Node {
            id: raw.id.clone(),
            draft,
        });
    }

    // Edges: endpoints, then handles.
    let mut seen_edges: HashMap<&str, ()> = HashMap::new();
    let mut links: Vec<Link> = Vec::new();
    for edge in &doc.edges {
        if seen_edges.insert(&edge.id, ()).is_some() {
            let message = format!("edge id '{}' is used by more than one edge", edge.id);
            issues.edge(codes::DUPLICATE_EDGE_ID, &edge.id, Some("id"), message);
            continue;
        }
        let source = endpoint(edge, "source", edge.source.as_deref(), &by_id, &mut issues);
        let target = endpoint(edge, "target", edge.target.as_deref(), &by_id, &mut issues);
        let (Some(source), Some(target)) = (source, target) else {
            continue;
        };
        let ports = resolve_edge(edge, &nodes[source], &nodes[target], &mut issues);
        links.push(Link {
            source,
            target,
            ports,
        });
    }

    check_ports(&nodes, &links, &by_id, &mut issues);

    // The graph as a whole.
    let mut graph: DiGraph<usize, ()> = DiGraph::with_capacity(nodes.len(), links.len());
    let indices: Vec<NodeIndex> = (0..nodes.len()).map(|i| graph.add_node(i)).collect();
    for link in &links {
        graph.add_edge(indices[link.source], indices[link.target], ());
    }
    check_cycles(&graph, &nodes, &mut issues);

    if !issues.is_empty() {
        return Err(issues.into_vec());
    }
    Ok(assemble(doc.name, doc.options, nodes, &links, &graph))
}

fn check_capable(id: &str, requirement: &Requirement, catalog: &Catalog, issues: &mut Issues) {
    if catalog.can_run(requirement) {
        return;
    }
    let what = match requirement.service {
        Service::ComfyUi if requirement.vram_mb > 0 => format!(
            "a ComfyUI node with capability '{}' and a card of at least {} MiB",
            requirement.capability, requirement.vram_mb
        ),
        Service::ComfyUi => format!(
            "a ComfyUI node with capability '{}'",
            requirement.capability
        ),
        Service::LangFlow => format!("a LangFlow node serving flow '{}'", requirement.capability),
    };
    let message = format!("no configured node can run step '{id}': it needs {what}");
    issues.node(codes::NO_CAPABLE_NODE, id, None, message);
}

fn endpoint(
    edge: &RawEdge,
    field: &str,
    id: Option<&str>,
    by_id: &HashMap<String, usize>,
    issues: &mut Issues,
) -> Option<usize> {
    // A missing or malformed endpoint was reported while reading the document.
    let id = id?;
    let found = by_id.get(id).copied();
    if found.is_none() {
        let message = format!(
            "edge '{}' {field} '{id}' is not a node of the workflow",
            edge.id
        );
        issues.edge(codes::MISSING_NODE, &edge.id, Some(field), message);
    }
    found
}

/// Names accepted as a source handle: a step has one output, whatever the canvas calls it.
fn source_handle_ok(handle: &str, produces: ArtifactKind) -> bool {
    matches!(handle, "out" | "output" | "source") || handle == produces.as_str()
}

/// Finds the ports of the target an edge feeds, reporting why when there are none.
fn resolve_edge(edge: &RawEdge, source: &Node, target: &Node, issues: &mut Issues) -> Vec<usize> {
    // Problems of either node were already reported; guessing their ports would only add noise.
    let (Some(source_draft), Some(target_draft)) = (&source.draft, &target.draft) else {
        return Vec::new();
    };
    let Some(kind) = source_draft.produces else {
        let message = format!(
            "edge '{}' leaves '{}', an output step, which produces nothing to pass on",
            edge.id, source.id
        );
        issues.edge_at_node(
            codes::NO_OUTPUT,
            &edge.id,
            &source.id,
            Some("source"),
            message,
        );
        return Vec::new();
    };
    if let Some(handle) = &edge.source_handle {
        if !source_handle_ok(handle, kind) {
            let message = format!(
                "edge '{}' sourceHandle {handle:?} is not an output of '{}' (it has one output: \
                 use null, \"out\" or \"{kind}\")",
                edge.id, source.id
            );
            let field = Some("sourceHandle");
            issues.edge_at_node(codes::UNKNOWN_HANDLE, &edge.id, &source.id, field, message);
        }
    }

    let ports = &target_draft.ports;
    if ports.is_empty() {
        let message = format!(
            "edge '{}' feeds '{}', but {} steps take no inputs",
            edge.id, target.id, target_draft.kind
        );
        issues.edge_at_node(
            codes::TOO_MANY_INPUTS,
            &edge.id,
            &target.id,
            Some("target"),
            message,
        );
        return Vec::new();
    }
    let handles = || {
        ports
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };

    let chosen: Vec<usize> = match edge.target_handle.as_deref() {
        Some(handle) => {
            let by_name = ports
                .iter()
                .position(|p| p.name == handle || p.name.strip_prefix('$') == Some(handle));
            if let Some(port) = by_name {
                vec![port]
            } else if let Some(handle_kind) = step::parse_kind(handle) {
                let matching: Vec<usize> = (0..ports.len())
                    .filter(|&i| ports[i].accepts.contains(&handle_kind))
                    .collect();
                match matching.len() {
                    1 => matching,
                    0 => {
                        let message = format!(
                            "edge '{}' targetHandle {handle:?}: '{}' has no {handle} input \
                             (its inputs: {})",
                            edge.id,
                            target.id,
                            handles()
                        );
                        let field = Some("targetHandle");
                        let code = codes::UNKNOWN_HANDLE;
                        issues.edge_at_node(code, &edge.id, &target.id, field, message);
                        return Vec::new();
                    }
                    _ => {
                        let names: Vec<&str> =
                            matching.iter().map(|&i| ports[i].name.as_str()).collect();
                        let message = format!(
                            "edge '{}' targetHandle {handle:?} fits several inputs of '{}' ({}); \
                             name one of them",
                            edge.id,
                            target.id,
                            names.join(", ")
                        );
                        let field = Some("targetHandle");
                        let code = codes::AMBIGUOUS_HANDLE;
                        issues.edge_at_node(code, &edge.id, &target.id, field, message);
                        return Vec::new();
                    }
                }
            } else {
                let message = format!(
                    "edge '{}' targetHandle {handle:?} is not an input of '{}' (its inputs: {})",
                    edge.id,
                    target.id,
                    handles()
                );
                let field = Some("targetHandle");
                issues.edge_at_node(codes::UNKNOWN_HANDLE, &edge.id, &target.id, field, message);
                return Vec::new();
            }
        }
        None => {
            // Bindings pinned to this source take it; otherwise the only free-for-all input
            // that accepts the kind does.
            let pinned: Vec<usize> = (0..ports.len())
                .filter(|&i| ports[i].pinned.as_deref() == Some(source.id.as_str()))
                .collect();
            if !pinned.is_empty() {
                pinned
            } else {
                let open: Vec<usize> = (0..ports.len())
                    .filter(|&i| ports[i].pinned.is_none() && ports[i].accepts.contains(&kind))
                    .collect();
                match open.len() {
                    1 => open,
                    0 => {
                        let message = format!(
                            "edge '{}': '{}' produces {kind}, which no input of {} step '{}' \
                             takes (its inputs: {})",
                            edge.id,
                            source.id,
                            target_draft.kind,
                            target.id,
                            describe_ports(ports)
                        );
                        let field = Some("target");
                        let code = codes::WRONG_INPUT_KIND;
                        issues.edge_at_node(code, &edge.id, &target.id, field, message);
                        return Vec::new();
                    }
                    _ => {
                        let names: Vec<&str> =
                            open.iter().map(|&i| ports[i].name.as_str()).collect();
                        let message = format!(
                            "edge '{}' carries {kind} into '{}', which has several {kind} inputs \
                             ({}); set targetHandle to one of them",
                            edge.id,
                            target.id,
                            names.join(", ")
                        );
                        let field = Some("targetHandle");
                        let code = codes::MISSING_HANDLE;
                        issues.edge_at_node(code, &edge.id, &target.id, field, message);
                        return Vec::new();
                    }
                }
            }
        }
    };

    // A handle chosen by name must still fit the artifact and the binding's source.
    let mut fed = Vec::with_capacity(chosen.len());
    for index in chosen {
        let port = &ports[index];
        if let Some(pinned) = port.pinned.as_deref().filter(|p| *p != source.id) {
            let message = format!(
                "edge '{}' feeds {} of '{}' from '{}', but that binding takes from '{pinned}'",
                edge.id, port.name, target.id, source.id
            );
            let field = Some("targetHandle");
            let code = codes::BINDING_SOURCE_MISMATCH;
            issues.edge_at_node(code, &edge.id, &target.id, field, message);
        } else if !port.accepts.contains(&kind) {
            let message = format!(
                "edge '{}': input {} of '{}' takes {}, but '{}' produces {kind}",
                edge.id,
                port.name,
                target.id,
                kinds_text(&port.accepts),
                source.id
            );
            let field = Some("target");
            issues.edge_at_node(
                codes::WRONG_INPUT_KIND,
                &edge.id,
                &target.id,
                field,
                message,
            );
        } else {
            fed.push(index);
        }
    }
    fed
}

fn kinds_text(kinds: &[ArtifactKind]) -> String {
    kinds
        .iter()
        .map(|k| k.as_str())
        .collect::<Vec<_>>()
        .join(" or ")
}

fn describe_ports(ports: &[Port]) -> String {
    let described: Vec<String> = ports
        .iter()
        .map(|p| format!("{} ({})", p.name, kinds_text(&p.accepts)))
        .collect();
    described.join(", ")
}

/// Counts the edges each port received: required ones need one, bounded ones no more.
fn check_ports(
    nodes: &[Node],
    links: &[Link],
    by_id: &HashMap<String, usize>,
    issues: &mut Issues,
) {
    let mut counts: BTreeMap<(usize, usize), usize> = BTreeMap::new();
    for link in links {
        for &port in &link.ports {
            *counts.entry((link.target, port)).or_default() += 1;
        }
    }
    for (index, node) in nodes.iter().enumerate() {
        let Some(draft) = &node.draft else { continue };
        for (port_index, port) in draft.ports.iter().enumerate() {
            let count = counts.get(&(index, port_index)).copied().unwrap_or(0);
            if let Some(max) = port.max.filter(|max| count > *max) {
                let message = format!(
                    "step '{}' input {} takes at most {max} edge(s), got {count}",
                    node.id, port.name
                );
                issues.node(codes::TOO_MANY_INPUTS, &node.id, Some(&port.field), message);
            }
            if let Some(from) = &port.pinned {
                if !by_id.contains_key(from) {
                    let field = format!("{}.from", port.field);
                    let message = format!(
                        "step '{}' binding {} takes from '{from}', which is not a node of the \
                         workflow",
                        node.id, port.name
                    );
                    issues.node(codes::MISSING_NODE, &node.id, Some(&field), message);
                    continue;
                }
            }
            if port.required && count == 0 {
                let message = match &port.pinned {
                    Some(from) => format!(
                        "step '{}' binding {} takes from '{from}', but no edge connects '{from}' \
                         to '{}'",
                        node.id, port.name, node.id
                    ),
                    None => format!(
                        "{} step '{}' needs an input: {} ({})",
                        draft.kind,
                        node.id,
                        port.name,
                        kinds_text(&port.accepts)
                    ),
                };
                issues.node(codes::MISSING_INPUT, &node.id, Some(&port.field), message);
            }
        }
    }
}

/// Reports each cycle once, naming the node on it that comes first in the document.
fn check_cycles(graph: &DiGraph<usize, ()>, nodes: &[Node], issues: &mut Issues) {
    for component in tarjan_scc(graph) {
        let looped = component.len() > 1
            || component
                .first()
                .is_some_and(|&n| graph.find_edge(n, n).is_some());
        if !looped {
            continue;
        }
        let mut members: Vec<usize> = component.iter().map(|&n| graph[n]).collect();
        members.sort_unstable();
        let names: Vec<&str> = members.iter().map(|&i| nodes[i].id.as_str()).collect();
        let Some(&first) = names.first() else {
            continue;
        };
        let message = if names.len() == 1 {
            format!("step '{first}' feeds itself")
        } else {
            format!(
                "steps {} form a cycle",
                names
                    .iter()
                    .map(|n| format!("'{n}'"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        issues.node(codes::CYCLE, first, None, message);
    }
}

/// Orders the steps (document order among the ready ones, so plans are stable) and builds
/// the plan. Only called on a graph already known to be acyclic and fully resolved.
fn assemble(
    name: String,
    options: RunOptions,
    nodes: Vec<Node>,
    links: &[Link],
    graph: &DiGraph<usize, ()>,
) -> Plan {
    let mut indegree: Vec<usize> = vec![0; nodes.len()];
    for link in links {
        indegree[link.target] += 1;
    }
    let mut ready: BinaryHeap<Reverse<usize>> = (0..nodes.len())
        .filter(|&i| indegree[i] == 0)
        .map(Reverse)
        .collect();
    let mut order = Vec::with_capacity(nodes.len());
    while let Some(Reverse(index)) = ready.pop() {
        order.push(index);
        for next in graph.neighbors_directed(NodeIndex::new(index), Direction::Outgoing) {
            let next = graph[next];
            indegree[next] -= 1;
            if indegree[next] == 0 {
                ready.push(Reverse(next));
            }
        }
    }

    let mut position = vec![0; nodes.len()];
    for (pos, &index) in order.iter().enumerate() {
        position[index] = pos;
    }

    let mut inputs: Vec<Vec<StepInput>> = vec![Vec::new(); nodes.len()];
    for link in links {
        let kind = nodes[link.source].draft.as_ref().and_then(|d| d.produces);
        let (Some(kind), Some(target)) = (kind, nodes[link.target].draft.as_ref()) else {
            continue;
        };
        for &port in &link.ports {
            inputs[link.target].push(StepInput {
                from: nodes[link.source].id.clone(),
                handle: Some(target.ports[port].name.clone()),
                kind,
            });
        }
    }

    let mut slots: Vec<Option<PlannedStep>> = (0..nodes.len()).map(|_| None).collect();
    for (index, (node, inputs)) in nodes.into_iter().zip(inputs).enumerate() {
        // Every node has a draft here: a missing one was an issue, and issues stop planning.
        let Some(draft) = node.draft else { continue };
        slots[position[index]] = Some(PlannedStep {
            id: node.id,
            kind: draft.kind,
            inputs,
            produces: draft.produces,
            requirement: draft.requirement,
            spec: draft.spec,
            retry: options.retry.overridden(draft.retry),
        });
    }
    let steps: Vec<PlannedStep> = slots.into_iter().flatten().collect();

    let mut dag: DiGraph<usize, ()> = DiGraph::with_capacity(steps.len(), links.len());
    for index in 0..steps.len() {
        dag.add_node(index);
    }
    for link in links {
        let (from, to) = (position[link.source], position[link.target]);
        dag.add_edge(NodeIndex::new(from), NodeIndex::new(to), ());
    }
    let by_id = steps
        .iter()
        .enumerate()
        .map(|(i, s)| (s.id.clone(), i))
        .collect();
    Plan {
        name,
        options,
        steps,
        by_id,
        graph: dag,
    }
}
