//! Retry policies: how often a remote step is tried and how long to wait in between.
//!
//! A policy comes from three places, field by field: the step's `data.retry`, else the
//! document's `options.retry`, else [`RetryPolicy::default`]. Both places share one shape,
//! `{"attempts": 1..=10, "backoff_ms": 0..=600000}` with both fields optional, and one reader
//! ([`read`]) so a step and the options refuse the same things with the same words.
//!
//! What is retried is the run actor's business (docs/workflows.md, "Retries"): transport
//! errors, lost prompts and unknown outcomes; never a ComfyUI validation error or a LangFlow
//! 4xx; an out-of-memory failure once, on another node, whatever `attempts` says.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::issue::describe;

/// Fewest and most attempts a document may ask for.
pub(crate) const MIN_ATTEMPTS: u32 = 1;
pub(crate) const MAX_ATTEMPTS: u32 = 10;
/// Longest base backoff a document may ask for (10 minutes).
pub(crate) const MAX_BACKOFF_MS: u64 = 600_000;
/// No single wait is longer than this, however many times the backoff has doubled.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// How a step that runs on a node is retried.
///
/// `attempts` counts every try, the first included: 1 means no retry. Between tries the run
/// waits [`RetryPolicy::backoff`], which starts at `backoff_ms` and doubles each time, never
/// more than 60 s. The default is 3 attempts and 1000 ms (waits of 1 s, then 2 s).
///
/// Deserializing fills absent fields from the default; ranges (attempts 1..=10, backoff_ms
/// 0..=600000) are checked when a document is planned, not here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Tries in all, the first included (1..=10 in a document).
    pub attempts: u32,
    /// Wait after the first failed try, in milliseconds; doubles after each further one.
    pub backoff_ms: u64,
}

impl Default for RetryPolicy {
    /// 3 attempts, 1000 ms backoff.
    fn default() -> RetryPolicy {
        RetryPolicy {
            attempts: 3,
            backoff_ms: 1000,
        }
    }
}

impl RetryPolicy {
    /// The wait after try number `attempt` (1-based: 1 is the first try) failed:
    /// `backoff_ms × 2^(attempt-1)`, capped at 60 s. Attempt 0 is read as 1. Never overflows.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1);
        let factor = 1u64.checked_shl(doublings).unwrap_or(u64::MAX);
        let millis = self.backoff_ms.saturating_mul(factor);
        Duration::from_millis(millis).min(MAX_BACKOFF)
    }

    /// Whether another try may follow try number `attempt` (1-based).
    pub fn allows_another(&self, attempt: u32) -> bool {
        attempt < self.attempts
    }

    /// This policy with the fields `over` sets replaced.
    pub(crate) fn overridden(self, over: RetryOverride) -> RetryPolicy {
        RetryPolicy {
            attempts: over.attempts.unwrap_or(self.attempts),
            backoff_ms: over.backoff_ms.unwrap_or(self.backoff_ms),
        }
    }
}

/// The fields a `retry` object sets; absent ones fall back to the next level.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RetryOverride {
    pub attempts: Option<u32>,
    pub backoff_ms: Option<u64>,
}

/// A problem with a `retry` object. `field` is relative to the object's parent: `retry`,
/// `retry.attempts`, `retry.<unknown key>`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RetryProblem {
    pub field: String,
    /// An unknown key rather than a bad value.
    pub unknown: bool,
    /// Completes a sentence that starts with the owner: "step 'x' " / "options ".
    pub message: String,
}

/// Reads a `retry` value (`null` means absent). Returns what it sets, leaving out whatever
/// is invalid, and every problem found. Never panics, whatever the JSON.
pub(crate) fn read(value: &Value) -> (RetryOverride, Vec<RetryProblem>) {
    let mut found = RetryOverride::default();
    let mut problems = Vec::new();
    let entries = match value {
        Value::Null => return (found, problems),
        Value::Object(entries) => entries,
        other => {
            problems.push(RetryProblem {
                field: "retry".to_owned(),
                unknown: false,
                message: format!(
                    "retry must be an object {{\"attempts\": {MIN_ATTEMPTS}..={MAX_ATTEMPTS}, \
                     \"backoff_ms\": 0..={MAX_BACKOFF_MS}}}, got {}",
                    describe(other)
                ),
            });
            return (found, problems);
        }
    };
    for (key, value) in entries {
        match key.as_str() {
            "attempts" => {
                let bounds = (u64::from(MIN_ATTEMPTS), u64::from(MAX_ATTEMPTS));
                found.attempts =
                    integer(value, bounds, key, &mut problems).and_then(|n| u32::try_from(n).ok());
            }
            "backoff_ms" => {
                found.backoff_ms = integer(value, (0, MAX_BACKOFF_MS), key, &mut problems);
            }
            _ => problems.push(RetryProblem {
                field: format!("retry.{key}"),
                unknown: true,
                message: format!("retry has no field {key:?} (it knows: attempts, backoff_ms)"),
            }),
        }
    }
    (found, problems)
}

/// A JSON integer within `min..=max`; `null` is absent. Anything else is a problem.
fn integer(
    value: &Value,
    (min, max): (u64, u64),
    key: &str,
    problems: &mut Vec<RetryProblem>,
) -> Option<u64> {
    if value.is_null() {
        return None;
    }
    if let Some(n) = value.as_u64().filter(|n| (min..=max).contains(n)) {
        return Some(n);
    }
    problems.push(RetryProblem {
        field: format!("retry.{key}"),
        unknown: false,
        message: format!(
            "retry.{key} must be an integer between {min} and {max}, got {}",
            describe(value)
        ),
    });
    None
}
