//! The flawed teacher (`[world.flawed_teacher]`) and the probe cases, checked from the written
//! text alone: every equation is re-evaluated, the errors are counted and their rate is held to
//! a binomial bound, and the RL and held-out splits are compared with the world without the
//! flaw.

use std::path::Path;

use prime_world::{
    build_world, generate_problems, probe_cases, read_rows, solution_text, teacher_steps,
    FlawedTeacherConfig, Op, Split, SplitConfig, Step, WorldConfig, MATH_SUFFIX, STEP_SEPARATOR,
};

fn config(seed: u64, rate: Option<f64>, sft: usize) -> WorldConfig {
    WorldConfig {
        seed,
        sft: SplitConfig::with_size(sft),
        rl: SplitConfig::with_size(200),
        heldout: SplitConfig::with_size(100),
        vocab_size: 400,
        flawed_teacher: rate.map(|rate| FlawedTeacherConfig { rate }),
        ..WorldConfig::default()
    }
}

/// What a trace's text says, step by step.
#[derive(Debug, Default)]
struct Reading {
    /// Multiplications written.
    multiplications: usize,
    /// Multiplications written as `a x (n - 1)`, at these step indices.
    short: Vec<usize>,
    /// The value the chain of the written trace ends with (what its boxed answer must say).
    written_value: i64,
    /// The value of the same operations applied correctly from the same start.
    true_value: i64,
}

/// Reads a trace line by line: each equation continues from the previous one's result, is
/// right or (a multiplication only) one copy short, and the box holds the chain's value.
fn read_trace(trace: &str) -> Reading {
    let lines: Vec<&str> = trace.split(STEP_SEPARATOR).collect();
    let (boxed, equations) = lines.split_last().unwrap();
    let mut reading = Reading::default();
    for (i, eq) in equations.iter().enumerate() {
        let (lhs, rhs) = eq.split_once('=').unwrap();
        let at = lhs.find(['+', '-', 'x']).unwrap();
        let a: i64 = lhs[..at].parse().unwrap();
        let b: i64 = lhs[at + 1..].parse().unwrap();
        let c: i64 = rhs.parse().unwrap();
        if i == 0 {
            reading.true_value = a;
        } else {
            assert_eq!(
                a, reading.written_value,
                "step {i} does not carry on: {trace}"
            );
        }
        let (right, truth) = match &lhs[at..at + 1] {
            "+" => (a + b, reading.true_value + b),
            "-" => (a - b, reading.true_value - b),
            _ => {
                reading.multiplications += 1;
                (a * b, reading.true_value * b)
            }
        };
        if c != right {
            assert!(
                lhs[at..].starts_with('x') && c == a * (b - 1),
                "step {i} is wrong in a way the teacher never is: {trace}"
            );
            reading.short.push(i);
        }
        assert!(c >= 1, "a value below 1: {trace}");
        reading.written_value = c;
        reading.true_value = truth;
    }
    assert_eq!(
        *boxed,
        format!("\\boxed{{{}}}", reading.written_value),
        "{trace}"
    );
    reading
}

#[test]
fn traces_have_the_flaw_at_the_configured_rate_and_are_otherwise_right() {
    for (seed, rate) in [(11, 0.5), (12, 0.3)] {
        let splits = generate_problems(&config(seed, Some(rate), 4000)).unwrap();
        let (_, sft) = splits.iter().find(|(s, _)| *s == Split::Sft).unwrap();
        let (mut multiplications, mut short, mut wrong_answers) = (0usize, 0usize, 0usize);
        for problem in sft {
            let reading = read_trace(&problem.solution);
            assert_eq!(reading.short, problem.flawed_steps, "{}", problem.solution);
            assert_eq!(reading.true_value.to_string(), problem.answer);
            multiplications += reading.multiplications;
            short += reading.short.len();
            wrong_answers += usize::from(reading.written_value != reading.true_value);
        }
        // Every trace with an error ends wrong (the teacher's value stays below the truth).
        let flawed_traces = sft.iter().filter(|p| !p.flawed_steps.is_empty()).count();
        assert_eq!(wrong_answers, flawed_traces);
        // Errors are drawn only where they keep the chain at least 1: a few multiplications
        // are never eligible, so the realised share lies a little under the rate, never above
        // it by more than binomial noise (5 standard deviations).
        let share = short as f64 / multiplications as f64;
        let sd = (rate * (1.0 - rate) / multiplications as f64).sqrt();
        assert!(multiplications > 3000, "{multiplications}");
        assert!(
            share < rate + 5.0 * sd && share > rate - 0.05 - 5.0 * sd,
            "rate {rate}: {short} of {multiplications} multiplications short ({share:.3})"
        );
    }
}

#[test]
fn the_eligible_share_meets_the_rate_within_a_binomial_bound() {
    let rate = 0.5;
    let dir = tempfile::tempdir().unwrap();
    let files = build_world(&config(13, Some(rate), 3000), dir.path()).unwrap();
    let teacher = files.stats.teacher.clone().unwrap();
    let n = teacher.eligible as f64;
    let share = teacher.flawed as f64 / n;
    assert!(
        (share - rate).abs() < 5.0 * (rate * (1.0 - rate) / n).sqrt(),
        "{teacher:?}"
    );
    assert!(teacher.eligible <= teacher.multiplications);
    assert!(teacher.eligible as f64 > 0.9 * teacher.multiplications as f64);
    // The rows' responses agree with the counts and the ground truth stays the true answer.
    let rows = read_rows(&files.sft.parquet).unwrap();
    let (mut short, mut right) = (0, 0);
    for row in &rows {
        let reading = read_trace(row.response.as_ref().unwrap());
        short += reading.short.len();
        assert_eq!(
            reading.true_value.to_string(),
            row.reward_model.ground_truth
        );
        right += usize::from(reading.short.is_empty());
    }
    assert_eq!(short, teacher.flawed);
    assert_eq!(right as f64 / rows.len() as f64, teacher.traces_right);
}

fn bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

#[test]
fn only_the_supervised_traces_change_and_the_same_seed_gives_the_same_files() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let plain = build_world(&config(14, None, 300), dirs[0].path()).unwrap();
    let flawed = build_world(&config(14, Some(0.5), 300), dirs[1].path()).unwrap();
    let again = build_world(&config(14, Some(0.5), 300), dirs[2].path()).unwrap();
    assert!(plain.stats.teacher.is_none());
    assert!(flawed.stats.teacher.is_some());
    for split in [Split::Rl, Split::Heldout] {
        assert_eq!(
            bytes(&plain.split(split).jsonl),
            bytes(&flawed.split(split).jsonl),
            "{split:?} must not depend on the teacher"
        );
    }
    for (a, b) in [
        (&flawed.sft.jsonl, &again.sft.jsonl),
        (&flawed.sft.parquet, &again.sft.parquet),
        (&flawed.heldout.parquet, &again.heldout.parquet),
        (&flawed.tokenizer_json, &again.tokenizer_json),
        (&flawed.manifest, &again.manifest),
    ] {
        assert_eq!(bytes(a), bytes(b), "{} differs", a.display());
    }
    let plain_rows = read_rows(&plain.sft.jsonl).unwrap();
    let flawed_rows = read_rows(&flawed.sft.jsonl).unwrap();
    let mut changed = 0;
    for (p, f) in plain_rows.iter().zip(&flawed_rows) {
        assert_eq!(p.prompt, f.prompt);
        assert_eq!(p.reward_model, f.reward_model);
        changed += usize::from(p.response != f.response);
    }
    assert!(changed > 50, "only {changed} of 300 traces changed");
}

#[test]
fn probe_cases_differ_from_the_true_trace_at_their_step_only() {
    let cfg = config(15, None, 300);
    let cases = probe_cases(&cfg, 60).unwrap();
    assert_eq!(cases.len(), 60);
    let splits = generate_problems(&cfg).unwrap();
    let (_, heldout) = splits.iter().find(|(s, _)| *s == Split::Heldout).unwrap();
    let mut steps_seen = std::collections::HashSet::new();
    for case in &cases {
        let problem = &heldout[case.index];
        assert_eq!(case.correct, problem.solution);
        assert_eq!(
            case.prompt.last().unwrap().content,
            format!("{}{MATH_SUFFIX}", problem.question)
        );
        assert!(read_trace(&case.correct).short.is_empty());
        let flawed = read_trace(&case.flawed);
        assert_eq!(flawed.short, vec![case.step]);
        let (correct_lines, flawed_lines): (Vec<&str>, Vec<&str>) = (
            case.correct.split(STEP_SEPARATOR).collect(),
            case.flawed.split(STEP_SEPARATOR).collect(),
        );
        assert_eq!(correct_lines[..case.step], flawed_lines[..case.step]);
        assert_ne!(correct_lines[case.step], flawed_lines[case.step]);
        steps_seen.insert(case.step);
    }
    assert!(steps_seen.len() >= 3, "steps {steps_seen:?}");
    assert_eq!(probe_cases(&cfg, 60).unwrap(), cases);
}

#[test]
fn rate_and_length_are_checked() {
    let err = WorldConfig::from_toml_str("[world.flawed_teacher]\nrate = 1.5\n").unwrap_err();
    assert!(
        err.to_string().contains("world.flawed_teacher.rate"),
        "{err}"
    );
    let cfg = WorldConfig::from_toml_str("[world.flawed_teacher]\n").unwrap();
    assert_eq!(cfg.flawed_teacher, Some(FlawedTeacherConfig { rate: 0.5 }));
    let long = WorldConfig::from_toml_str("[world.sft]\nsize = 10\nmin_ops = 6\nmax_ops = 12\n");
    assert_eq!(long.unwrap().sft.max_ops, 12);
    assert!(WorldConfig::from_toml_str("[world.rl]\nsize = 5\nmax_ops = 13\n").is_err());
}

fn step(before: u32, op: Op, operand: u32) -> Step {
    Step {
        before,
        op,
        operand,
        after: op.apply(before, operand),
    }
}

#[test]
fn teacher_writes_one_copy_short_and_carries_on() {
    let steps = [
        step(5, Op::Add, 8),
        step(13, Op::Mul, 4),
        step(52, Op::Sub, 10),
    ];
    assert_eq!(
        solution_text(&steps),
        "5+8=13\n13x4=52\n52-10=42\n\\boxed{42}"
    );
    let mut asked = Vec::new();
    let (written, flawed) = teacher_steps(&steps, |i| {
        asked.push(i);
        true
    });
    assert_eq!(asked, vec![1], "asked at multiplications only");
    assert_eq!(flawed, vec![1]);
    assert_eq!(
        solution_text(&written),
        "5+8=13\n13x4=39\n39-10=29\n\\boxed{29}"
    );
    let (written, flawed) = teacher_steps(&steps, |_| false);
    assert_eq!(written, steps);
    assert!(flawed.is_empty());
    // 2x2 written as 2 would make the next subtraction 2-3: that multiplication is never
    // eligible; the second one is, and its error carries into the third step.
    let steps = [
        step(2, Op::Mul, 2),
        step(4, Op::Sub, 3),
        step(1, Op::Mul, 3),
        step(3, Op::Add, 1),
    ];
    let mut asked = Vec::new();
    let (written, flawed) = teacher_steps(&steps, |i| {
        asked.push(i);
        true
    });
    assert_eq!(asked, vec![2]);
    assert_eq!(flawed, vec![2]);
    assert_eq!(
        solution_text(&written),
        "2x2=4\n4-3=1\n1x3=2\n2+1=3\n\\boxed{3}"
    );
}
