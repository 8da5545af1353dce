//! What each built-in flow answers. All answers are deterministic functions
//! of the input, so tests can assert on them.

use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::media;

/// The behaviour of a simulated flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowBehavior {
    /// Chat Input -> Chat Output, as recorded.
    Echo,
    /// A short narration derived from the input text.
    NarrateText,
    /// Describes the image or video attached through the ChatInput `files`
    /// tweak, with its real size and frame count.
    NarrateVisual,
    /// Expands a short image prompt into a detailed one.
    ExpandPrompt,
    /// A component raises at run time (09_flow_runtime_error).
    Fail,
}

impl FlowBehavior {
    /// The component between input and output, `(id, display name)`; the
    /// answer's `source` names it. Echo's answer names the Chat Input.
    pub fn middle(self) -> (&'static str, &'static str) {
        match self {
            FlowBehavior::Echo => ("ChatInput-aaaa1", "Chat Input"),
            FlowBehavior::Fail => ("CombineText-bbbb2", "Combine Text"),
            _ => ("LanguageModelComponent-cccc2", "Language Model"),
        }
    }

    /// Whether the flow stands for an LLM (streams tokens, takes time).
    pub fn generates(self) -> bool {
        matches!(
            self,
            FlowBehavior::NarrateText | FlowBehavior::NarrateVisual | FlowBehavior::ExpandPrompt
        )
    }
}

fn pick<'a>(input: &str, salt: &str, choices: &[&'a str]) -> &'a str {
    let digest = Sha256::digest(format!("{salt}:{input}").as_bytes());
    choices[usize::from(digest[0]) % choices.len()]
}

/// A two-sentence narration of `input`.
pub fn narrate_text(input: &str) -> String {
    let words: Vec<&str> = input.split_whitespace().take(16).collect();
    if words.is_empty() {
        return "There is nothing to narrate yet.".into();
    }
    let subject = words.join(" ").trim_end_matches(['.', '!', '?']).to_owned();
    format!("We open on {subject}. {}", mood_sentence(input))
}

/// "The moment feels …, and the camera …": the closing sentence, picked from `input`.
fn mood_sentence(input: &str) -> String {
    let mood = pick(
        input,
        "mood",
        &[
            "quiet", "luminous", "restless", "tender", "stark", "hopeful",
        ],
    );
    let beat = pick(
        input,
        "beat",
        &["lingers", "drifts closer", "holds still", "pulls back"],
    );
    format!("The moment feels {mood}, and the camera {beat} as it settles.")
}

/// `input` with style, light and lens details appended.
pub fn expand_prompt(input: &str) -> String {
    let base = input.trim().trim_end_matches([',', '.']);
    let style = pick(
        input,
        "style",
        &["cinematic", "painterly", "documentary", "dreamlike"],
    );
    let light = pick(
        input,
        "light",
        &["golden hour light", "soft overcast light", "neon glow"],
    );
    format!("{base}, {style} composition, {light}, highly detailed, sharp focus, 35mm photograph")
}

/// Describes the attached files (paths below `root`), then closes with a mood: what a
/// vision model asked to narrate footage would say, without repeating the instructions.
pub fn narrate_visual(input: &str, root: &Path, files: &[String]) -> String {
    let described: Vec<String> = files.iter().map(|f| describe(root, f)).collect();
    if described.is_empty() {
        return format!("No image or video was attached. {}", narrate_text(input));
    }
    let description = described.join(" ");
    let mood = mood_sentence(&format!("{input}{description}"));
    format!("{description} {mood}")
}

fn describe(root: &Path, file: &str) -> String {
    let relative = Path::new(file);
    let safe = relative
        .components()
        .all(|c| matches!(c, std::path::Component::Normal(_)));
    let bytes = if safe {
        std::fs::read(root.join(relative)).ok()
    } else {
        None
    };
    match bytes.as_deref().and_then(media::probe) {
        Some(info) if info.frames > 1 => format!(
            "A {}-frame {} clip at {}x{}.",
            info.frames, info.format, info.width, info.height
        ),
        Some(info) => format!("A {}x{} {} image.", info.width, info.height, info.format),
        None => format!("An unreadable attachment ({file})."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_deterministic() {
        assert_eq!(narrate_text("a red fox"), narrate_text("a red fox"));
        assert!(narrate_text("a red fox").starts_with("We open on a red fox."));
        assert!(expand_prompt("a cat").starts_with("a cat, "));
    }
}
