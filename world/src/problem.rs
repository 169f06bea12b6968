//! Seeded arithmetic word problems with step-by-step solutions.
//!
//! A problem starts from a value and applies 2 to 5 operations (+, -, x). The question tells
//! them as a short story in one of several templates; the solution writes one equation per
//! step, separated by [`STEP_SEPARATOR`], and ends with the answer in `\boxed{}`:
//!
//! ```text
//! 5-1=4
//! 4+9=13
//! 13x3=39
//! \boxed{39}
//! ```
//!
//! Equations carry no spaces: Qwen2's pre-tokenizer makes a space before a digit a token of its
//! own, so `13 x 3 = 39` costs two tokens more than `13x3=39` for nothing.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::WorldConfig;

/// Separates the steps of a solution trace (and the final `\boxed{}` line). A step splitter
/// cuts a response at this string; the tokenizer keeps it as a token of its own.
pub const STEP_SEPARATOR: &str = "\n";

/// One arithmetic operation applied to the running value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// `value + operand`.
    Add,
    /// `value - operand`; the result stays at least 1.
    Sub,
    /// `value x operand`.
    Mul,
}

impl Op {
    /// The symbol written in solution traces.
    pub fn symbol(self) -> &'static str {
        match self {
            Op::Add => "+",
            Op::Sub => "-",
            Op::Mul => "x",
        }
    }

    /// Applies the operation.
    pub fn apply(self, value: u32, operand: u32) -> u32 {
        match self {
            Op::Add => value + operand,
            Op::Sub => value - operand,
            Op::Mul => value * operand,
        }
    }
}

/// One solution step: `before op operand = after`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    pub before: u32,
    pub op: Op,
    pub operand: u32,
    pub after: u32,
}

impl Step {
    /// The step as written in the trace, e.g. `13x3=39`.
    pub fn equation(&self) -> String {
        format!(
            "{}{}{}={}",
            self.before,
            self.op.symbol(),
            self.operand,
            self.after
        )
    }
}

/// The story a question is told in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Template {
    /// A person collecting objects: buys, gives away.
    Collection,
    /// A person's money: earns, spends.
    Savings,
    /// People on a bus: get on, get off.
    Bus,
    /// Flowers in a garden: bloom, are picked.
    Garden,
    /// Animals on a farm: are born, are sold.
    Farm,
    /// A number game: adds, subtracts, multiplies.
    Number,
}

impl Template {
    /// Every template, in the order the generator draws from.
    pub const ALL: [Template; 6] = [
        Template::Collection,
        Template::Savings,
        Template::Bus,
        Template::Garden,
        Template::Farm,
        Template::Number,
    ];

    /// The template's name as written to `extra_info.template`.
    pub fn name(self) -> &'static str {
        match self {
            Template::Collection => "collection",
            Template::Savings => "savings",
            Template::Bus => "bus",
            Template::Garden => "garden",
            Template::Farm => "farm",
            Template::Number => "number",
        }
    }
}

/// A character of a story: name and pronouns.
struct Person {
    name: &'static str,
    subject: &'static str,
    possessive: &'static str,
}

const PEOPLE: [Person; 12] = [
    Person {
        name: "Mia",
        subject: "she",
        possessive: "her",
    },
    Person {
        name: "Leo",
        subject: "he",
        possessive: "his",
    },
    Person {
        name: "Ava",
        subject: "she",
        possessive: "her",
    },
    Person {
        name: "Sam",
        subject: "he",
        possessive: "his",
    },
    Person {
        name: "Emma",
        subject: "she",
        possessive: "her",
    },
    Person {
        name: "Noah",
        subject: "he",
        possessive: "his",
    },
    Person {
        name: "Lily",
        subject: "she",
        possessive: "her",
    },
    Person {
        name: "Omar",
        subject: "he",
        possessive: "his",
    },
    Person {
        name: "Zoe",
        subject: "she",
        possessive: "her",
    },
    Person {
        name: "Ben",
        subject: "he",
        possessive: "his",
    },
    Person {
        name: "Nina",
        subject: "she",
        possessive: "her",
    },
    Person {
        name: "Ivan",
        subject: "he",
        possessive: "his",
    },
];

const COLLECTED: [&str; 6] = ["apples", "pens", "stickers", "marbles", "books", "cards"];
const ANIMALS: [&str; 4] = ["sheep", "cows", "goats", "pigs"];

/// One generated problem.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// The word problem, without the answer-format suffix.
    pub question: String,
    /// The trace as written ([`solution_text`]): the true steps, or a flawed teacher's when
    /// `flawed_steps` is not empty, whose boxed value then differs from `answer`.
    pub solution: String,
    /// The true final value as a decimal string (the ground truth).
    pub answer: String,
    /// Number of operations: the problem's difficulty level.
    pub num_ops: usize,
    /// The story the question is told in.
    pub template: Template,
    /// The true steps of the problem.
    pub steps: Vec<Step>,
    /// Indices of the steps that `solution` writes wrong (a flawed teacher's trace, see
    /// [`teacher_steps`]); empty for a correct trace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flawed_steps: Vec<usize>,
}

impl Problem {
    /// This problem with `solution` written by a teacher that errs at the steps `flaw` picks
    /// (see [`teacher_steps`]); `answer` stays the true one.
    pub fn taught(mut self, flaw: impl FnMut(usize) -> bool) -> Problem {
        let (written, flawed) = teacher_steps(&self.steps, flaw);
        self.solution = solution_text(&written);
        self.flawed_steps = flawed;
        self
    }
}

/// The value after the last step (`steps` is never empty: a problem has at least one
/// operation).
fn final_value(steps: &[Step]) -> u32 {
    steps.last().map_or(0, |s| s.after)
}

/// A trace as written: one equation per step joined by [`STEP_SEPARATOR`], then
/// `\boxed{value after the last step}`.
pub fn solution_text(steps: &[Step]) -> String {
    let mut lines: Vec<String> = steps.iter().map(Step::equation).collect();
    lines.push(format!("\\boxed{{{}}}", final_value(steps)));
    lines.join(STEP_SEPARATOR)
}

/// The steps a flawed teacher writes for the true `steps`, and the indices of those it writes
/// wrong. The teacher's one error: a multiplication `a x n` written as `a x (n - 1)`
/// (`13x4=39`, one copy short). It then carries on from its own value, so later steps are
/// right given what it wrote and the boxed answer follows its chain.
///
/// `flaw(i)` is asked at each multiplication `i` where the error is possible: where the
/// chain from the short product, with no further error, keeps every value at least 1 (a
/// smaller running value could make a later subtraction reach 0 or below, which the world
/// never writes). Elsewhere the teacher writes the step right.
pub fn teacher_steps(
    steps: &[Step],
    mut flaw: impl FnMut(usize) -> bool,
) -> (Vec<Step>, Vec<usize>) {
    let mut written = Vec::with_capacity(steps.len());
    let mut flawed = Vec::new();
    let mut value = steps.first().map_or(0, |s| s.before);
    for (i, step) in steps.iter().enumerate() {
        let short = step.operand.saturating_sub(1) * value;
        let err = step.op == Op::Mul && stays_positive(short, &steps[i + 1..]) && flaw(i);
        let after = if err {
            flawed.push(i);
            short
        } else {
            step.op.apply(value, step.operand)
        };
        written.push(Step {
            before: value,
            after,
            ..*step
        });
        value = after;
    }
    (written, flawed)
}

/// Whether applying `rest` to `value` keeps every value at least 1.
fn stays_positive(mut value: u32, rest: &[Step]) -> bool {
    if value == 0 {
        return false;
    }
    for step in rest {
        match step.op {
            Op::Sub if step.operand >= value => return false,
            op => value = op.apply(value, step.operand),
        }
    }
    true
}

/// Draws random problems within the ranges of a [`WorldConfig`].
pub struct ProblemGenerator {
    rng: ChaCha8Rng,
    max_start: u32,
    max_addend: u32,
    max_factor: u32,
    max_value: u32,
}

impl ProblemGenerator {
    /// A generator over `rng` with the value ranges of `cfg`.
    pub fn new(cfg: &WorldConfig, rng: ChaCha8Rng) -> Self {
        ProblemGenerator {
            rng,
            max_start: cfg.max_start,
            max_addend: cfg.max_addend,
            max_factor: cfg.max_factor,
            max_value: cfg.max_value,
        }
    }

    /// A problem whose operation count is drawn uniformly from `min_ops..=max_ops`.
    pub fn generate_in(&mut self, min_ops: usize, max_ops: usize) -> Problem {
        let num_ops = self.rng.gen_range(min_ops as u32..=max_ops as u32) as usize;
        self.generate(num_ops)
    }

    /// A problem with exactly `num_ops` operations.
    pub fn generate(&mut self, num_ops: usize) -> Problem {
        let template = Template::ALL[self.index(Template::ALL.len())];
        let person = &PEOPLE[self.index(PEOPLE.len())];
        let object = match template {
            Template::Collection => COLLECTED[self.index(COLLECTED.len())],
            Template::Farm => ANIMALS[self.index(ANIMALS.len())],
            _ => "",
        };
        let start = self.rng.gen_range(1..=self.max_start.min(self.max_value));
        let steps = self.steps(start, num_ops);
        let question = tell(template, person, object, start, &steps);
        Problem {
            question,
            solution: solution_text(&steps),
            answer: final_value(&steps).to_string(),
            num_ops,
            template,
            steps,
            flawed_steps: Vec::new(),
        }
    }

    /// A uniform index below `len`; drawn as `u32` so streams agree across platforms.
    fn index(&mut self, len: usize) -> usize {
        self.rng.gen_range(0..len as u32) as usize
    }

    /// `num_ops` steps from `start`, each op drawn uniformly among those whose result stays
    /// in `1..=max_value`.
    fn steps(&mut self, start: u32, num_ops: usize) -> Vec<Step> {
        let mut value = start;
        let mut steps = Vec::with_capacity(num_ops);
        for _ in 0..num_ops {
            let mut feasible = Vec::with_capacity(3);
            if value < self.max_value {
                feasible.push(Op::Add);
            }
            if value >= 2 {
                feasible.push(Op::Sub);
            }
            if value * 2 <= self.max_value {
                feasible.push(Op::Mul);
            }
            let op = feasible[self.index(feasible.len())];
            let operand = match op {
                Op::Add => self
                    .rng
                    .gen_range(1..=self.max_addend.min(self.max_value - value)),
                Op::Sub => self.rng.gen_range(1..=self.max_addend.min(value - 1)),
                Op::Mul => self
                    .rng
                    .gen_range(2..=self.max_factor.min(self.max_value / value)),
            };
            let after = op.apply(value, operand);
            steps.push(Step {
                before: value,
                op,
                operand,
                after,
            });
            value = after;
        }
        steps
    }
}

/// Tells the steps as a story: an opening sentence, one clause per operation joined by
/// ", then", and the question.
fn tell(template: Template, person: &Person, object: &str, start: u32, steps: &[Step]) -> String {
    let Person {
        name,
        subject,
        possessive,
    } = person;
    let opening = match template {
        Template::Collection => format!("{name} has {start} {object}."),
        Template::Savings => format!("{name} has {start} dollars."),
        Template::Bus => format!("A bus has {start} people."),
        Template::Garden => format!("A garden has {start} flowers."),
        Template::Farm => format!("A farm has {start} {object}."),
        Template::Number => format!("{name} thinks of the number {start}."),
    };
    let clauses: Vec<String> = steps
        .iter()
        .map(|step| {
            let n = step.operand;
            match (template, step.op) {
                (Template::Collection, Op::Add) => format!("{subject} buys {n} more"),
                (Template::Collection, Op::Sub) => format!("{subject} gives away {n}"),
                (Template::Collection, Op::Mul) => {
                    format!("{possessive} {object} are multiplied by {n}")
                }
                (Template::Savings, Op::Add) => format!("{subject} earns {n}"),
                (Template::Savings, Op::Sub) => format!("{subject} spends {n}"),
                (Template::Savings, Op::Mul) => {
                    format!("{possessive} money is multiplied by {n}")
                }
                (Template::Bus, Op::Add) => format!("{n} get on"),
                (Template::Bus, Op::Sub) => format!("{n} get off"),
                (Template::Bus, Op::Mul) => format!("the crowd grows {n} times as big"),
                (Template::Garden, Op::Add) => format!("{n} more bloom"),
                (Template::Garden, Op::Sub) => format!("{n} are picked"),
                (Template::Garden, Op::Mul) => format!("the flowers multiply by {n}"),
                (Template::Farm, Op::Add) => format!("{n} are born"),
                (Template::Farm, Op::Sub) => format!("{n} are sold"),
                (Template::Farm, Op::Mul) => format!("the herd grows {n} times as big"),
                (Template::Number, Op::Add) => format!("{subject} adds {n}"),
                (Template::Number, Op::Sub) => format!("{subject} subtracts {n}"),
                (Template::Number, Op::Mul) => format!("{subject} multiplies by {n}"),
            }
        })
        .collect();
    let question = match template {
        Template::Collection => format!("How many {object} does {subject} have now?"),
        Template::Savings => format!("How many dollars does {subject} have now?"),
        Template::Bus => "How many people are on the bus now?".to_string(),
        Template::Garden => "How many flowers are in the garden now?".to_string(),
        Template::Farm => format!("How many {object} are on the farm now?"),
        Template::Number => format!("What number does {subject} get?"),
    };
    format!(
        "{opening} {}. {question}",
        capitalize_first(&clauses.join(", then "))
    )
}

fn capitalize_first(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    fn generator(seed: u64) -> ProblemGenerator {
        ProblemGenerator::new(&WorldConfig::default(), ChaCha8Rng::seed_from_u64(seed))
    }

    /// Re-evaluates a trace from its text alone, so the check does not trust `steps`.
    fn evaluate_trace(solution: &str) -> (u32, String) {
        let lines: Vec<&str> = solution.split(STEP_SEPARATOR).collect();
        let (boxed, equations) = lines.split_last().unwrap();
        let mut value = None;
        for eq in equations {
            let (lhs, rhs) = eq.split_once('=').unwrap();
            let split = lhs.find(|c: char| !c.is_ascii_digit()).unwrap();
            let (a, rest) = lhs.split_at(split);
            let (op, b) = rest.split_at(1);
            let a: u32 = a.parse().unwrap();
            if let Some(v) = value {
                assert_eq!(
                    a, v,
                    "step does not continue from the previous result: {solution}"
                );
            }
            let b: u32 = b.parse().unwrap();
            let expected = match op {
                "+" => a + b,
                "-" => a - b,
                "x" => a * b,
                other => panic!("unknown op {other}"),
            };
            assert_eq!(rhs.parse::<u32>().unwrap(), expected, "{eq}");
            value = Some(expected);
        }
        (value.unwrap(), boxed.to_string())
    }

    #[test]
    fn traces_are_correct_and_values_stay_in_range() {
        let mut g = generator(1);
        for i in 0..2000 {
            let p = g.generate_in(2, 5);
            assert!((2..=5).contains(&p.num_ops));
            assert_eq!(p.steps.len(), p.num_ops);
            let (value, boxed) = evaluate_trace(&p.solution);
            assert_eq!(value.to_string(), p.answer, "problem {i}");
            assert_eq!(boxed, format!("\\boxed{{{}}}", p.answer));
            assert!((1..=20).contains(&p.steps[0].before));
            for s in &p.steps {
                assert!((1..=999).contains(&s.after), "{s:?}");
                match s.op {
                    Op::Add | Op::Sub => assert!((1..=20).contains(&s.operand)),
                    Op::Mul => assert!((2..=5).contains(&s.operand)),
                }
            }
        }
    }

    #[test]
    fn every_template_and_op_occurs() {
        let mut g = generator(2);
        let problems: Vec<Problem> = (0..600).map(|_| g.generate(3)).collect();
        for t in Template::ALL {
            assert!(
                problems.iter().any(|p| p.template == t),
                "{t:?} never drawn"
            );
        }
        for op in [Op::Add, Op::Sub, Op::Mul] {
            assert!(problems.iter().flat_map(|p| &p.steps).any(|s| s.op == op));
        }
    }

    #[test]
    fn questions_mention_every_operand_in_order() {
        let mut g = generator(3);
        for _ in 0..500 {
            let p = g.generate_in(2, 5);
            let numbers: Vec<u32> = p
                .question
                .split(|c: char| !c.is_ascii_digit())
                .filter(|s| !s.is_empty())
                .map(|s| s.parse().unwrap())
                .collect();
            let mut expected = vec![p.steps[0].before];
            expected.extend(p.steps.iter().map(|s| s.operand));
            assert_eq!(numbers, expected, "{}", p.question);
            assert!(p.question.ends_with('?'));
            assert!(p.question.chars().next().unwrap().is_uppercase());
        }
    }

    #[test]
    fn same_seed_same_problems() {
        let a: Vec<Problem> = {
            let mut g = generator(9);
            (0..50).map(|_| g.generate_in(2, 5)).collect()
        };
        let b: Vec<Problem> = {
            let mut g = generator(9);
            (0..50).map(|_| g.generate_in(2, 5)).collect()
        };
        let c: Vec<Problem> = {
            let mut g = generator(10);
            (0..50).map(|_| g.generate_in(2, 5)).collect()
        };
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
