//! Eurus-2-RL-Data rows (prime-spec section 9.1) and how a [`Problem`] becomes one.

use serde::{Deserialize, Serialize};

use crate::{Problem, Split, WorldConfig};

/// Suffix appended to every math question (prime-spec 9.2, the PRIME README's math prompt).
pub const MATH_SUFFIX: &str = "\n\nPresent the answer in LaTex format: \\boxed{Your answer}";

/// Suffix appended to every code statement (prime-spec 9.2, the PRIME README's code prompt).
pub const CODE_SUFFIX: &str =
    "\n\nWrite Python code to solve the problem. Present the code in \n```python\nYour code\n```\nat the end.";

/// The system message of every Eurus-2-RL-Data prompt: the "short" action-centric prompt of
/// prime-spec 9.2. It starts and ends with a newline.
pub const SYSTEM_PROMPT: &str = "
When tackling complex reasoning tasks, you have access to the following actions. Use them as needed to progress through your thought process.

[ASSESS]

[ADVANCE]

[VERIFY]

[SIMPLIFY]

[SYNTHESIZE]

[PIVOT]

[OUTPUT]

You should strictly follow the format below:

[ACTION NAME]

# Your action step 1

# Your action step 2

# Your action step 3

...

Next action: [NEXT ACTION NAME]
";

/// One chat message of a prompt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.to_string(),
            content: content.into(),
        }
    }
}

/// The `reward_model` column: how a response is graded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RewardModel {
    /// Always `rule` in Eurus-2-RL-Data: graded by the rule-based verifier.
    pub style: String,
    /// The final answer for math (a LaTeX string), the JSON test spec for code.
    pub ground_truth: String,
}

/// The `extra_info` column. Eurus-2-RL-Data fills only `split` and `index`; the world adds
/// the problem's difficulty and template so evaluation can be broken down by them. Any other
/// key of a JSONL row is kept in `other`, so a custom verifier gets it (docs/verifier.md).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtraInfo {
    /// The split the row belongs to ("" when the row does not say).
    #[serde(default)]
    pub split: String,
    /// Row index within the split (0 when the row does not say).
    #[serde(default)]
    pub index: i64,
    /// Number of operations (difficulty level); absent in data sets other than this world.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_ops: Option<i64>,
    /// Question template name; absent in data sets other than this world.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// Every other key of a JSONL row's `extra_info` (parquet files: the four above only).
    #[serde(flatten)]
    pub other: std::collections::BTreeMap<String, serde_json::Value>,
}

/// One row in the layout of Eurus-2-RL-Data (veRL's RL format), plus an optional `response`.
///
/// `response` holds the full solution trace in the supervised split only (the text the
/// assistant should produce, without `<|im_end|>`); it is absent elsewhere and in
/// Eurus-2-RL-Data itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataRow {
    pub data_source: String,
    /// Chat messages: an optional system message, then the user message.
    pub prompt: Vec<ChatMessage>,
    /// `math` or `code`: selects the verifier.
    pub ability: String,
    pub reward_model: RewardModel,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra_info: Option<ExtraInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<String>,
}

impl DataRow {
    /// The row for `problem`, row `index` of `split`; only the supervised split keeps the trace.
    pub fn from_problem(problem: &Problem, split: Split, index: usize, cfg: &WorldConfig) -> Self {
        let mut prompt = Vec::with_capacity(2);
        if let Some(system) = &cfg.system_prompt {
            prompt.push(ChatMessage::new("system", system.clone()));
        }
        prompt.push(ChatMessage::new(
            "user",
            format!("{}{MATH_SUFFIX}", problem.question),
        ));
        DataRow {
            data_source: cfg.data_source.clone(),
            prompt,
            ability: "math".to_string(),
            reward_model: RewardModel {
                style: "rule".to_string(),
                ground_truth: problem.answer.clone(),
            },
            extra_info: Some(ExtraInfo {
                split: split.name().to_string(),
                index: index as i64,
                num_ops: Some(problem.num_ops as i64),
                template: Some(problem.template.name().to_string()),
                other: Default::default(),
            }),
            response: (split == Split::Sft).then(|| problem.solution.clone()),
        }
    }

    /// The user message's content (the last user message; Eurus rows have exactly one).
    pub fn question(&self) -> Option<&str> {
        self.prompt
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map(|m| m.content.as_str())
    }

    /// Checks what every consumer relies on; returns the offending field and why.
    pub fn check(&self) -> Result<(), (String, String)> {
        if self.prompt.is_empty() {
            return Err(("prompt".into(), "no messages".into()));
        }
        for (i, message) in self.prompt.iter().enumerate() {
            if !matches!(message.role.as_str(), "system" | "user" | "assistant") {
                return Err((
                    format!("prompt[{i}].role"),
                    format!("unknown role {:?}", message.role),
                ));
            }
        }
        if self.question().is_none() {
            return Err(("prompt".into(), "no user message".into()));
        }
        if self.ability.is_empty() {
            return Err(("ability".into(), "empty".into()));
        }
        if self.reward_model.ground_truth.is_empty() {
            return Err(("reward_model.ground_truth".into(), "empty".into()));
        }
        Ok(())
    }
}
