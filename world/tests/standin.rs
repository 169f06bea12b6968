//! The Eurus-2-RL-Data stand-in at a small size: row counts, the ability mix, the schema, the
//! bad rows, determinism, the prompt lengths under its own tokenizer, and reference responses
//! graded by the project's graders (math in process, code in the sandbox).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use arrow_schema::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use prime_verifier::{Ability, GradeItem, Grader, GraderConfig};
use prime_world::standin::code::CodeForm;
use prime_world::standin::filler::estimate_tokens;
use prime_world::standin::{
    build_standin, standin_row, Fault, RowKind, StandinConfig, StandinFiles, StandinSplit,
    BAD_ROW_OFFSET,
};
use prime_world::tokenizer::{encode, render_chatml};
use prime_world::{read_row_results, DataRow, CODE_SUFFIX, MATH_SUFFIX, SYSTEM_PROMPT};

/// 40,000 training rows hold one bad row of each fault.
const TRAIN: usize = 40_000;
const VALIDATION: usize = 256;

struct Built {
    _dir: tempfile::TempDir,
    files: StandinFiles,
}

fn standin() -> &'static StandinFiles {
    static BUILT: OnceLock<Built> = OnceLock::new();
    &BUILT
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let cfg = StandinConfig {
                seed: 7,
                train_rows: TRAIN,
                validation_rows: VALIDATION,
            };
            let files = build_standin(&cfg, dir.path(), &|_, _, _| {}).unwrap();
            Built { _dir: dir, files }
        })
        .files
}

/// Every row of a file, the bad ones as the reader's error text.
fn read(path: &Path) -> Vec<Result<DataRow, String>> {
    read_row_results(path)
        .unwrap()
        .into_iter()
        .map(|r| r.map_err(|e| e.to_string()))
        .collect()
}

fn user(row: &DataRow) -> &str {
    row.question().unwrap()
}

#[test]
fn counts_mix_and_bad_rows_are_as_documented() {
    let files = standin();
    let train = read(&files.train);
    assert_eq!(train.len(), TRAIN);
    let code_expected = TRAIN * 55 / 1000;

    let mut by_ability: BTreeMap<String, usize> = BTreeMap::new();
    let mut reader_errors = Vec::new();
    for (i, row) in train.iter().enumerate() {
        match row {
            Ok(row) => *by_ability.entry(row.ability.clone()).or_default() += 1,
            Err(e) => reader_errors.push((i, e.clone())),
        }
    }
    // Two faults the reader refuses (empty ground truth, unknown role); two it passes on to
    // the learner's validation (unknown ability, a code row without a test spec).
    assert_eq!(reader_errors.len(), 2, "{reader_errors:?}");
    assert_eq!(reader_errors[0].0, BAD_ROW_OFFSET);
    assert!(reader_errors[0].1.contains("reward_model.ground_truth"));
    assert_eq!(reader_errors[1].0, 10_000 + BAD_ROW_OFFSET);
    assert!(reader_errors[1].1.contains("unknown role \"narrator\""));
    assert_eq!(by_ability["physics"], 1);
    let physics = train[20_000 + BAD_ROW_OFFSET].as_ref().unwrap();
    assert_eq!(physics.ability, "physics");
    let no_spec = train[30_000 + BAD_ROW_OFFSET].as_ref().unwrap();
    assert_eq!(no_spec.ability, "code");
    assert!(serde_json::from_str::<serde_json::Value>(&no_spec.reward_model.ground_truth).is_err());

    // 94.5% math, 5.5% code; each bad row took one row of either kind.
    let (math, code) = (by_ability["math"], by_ability["code"]);
    assert_eq!(math + code + 1 + 2, TRAIN);
    assert!(code.abs_diff(code_expected) <= 4, "{code} code rows");
    assert!((math as f64 / TRAIN as f64 - 0.945).abs() < 0.001);

    let counts = &files.stats.train;
    assert_eq!(counts.rows, TRAIN);
    assert_eq!(counts.bad, 4);
    assert_eq!(
        counts.math + counts.code_stdin + counts.code_call + counts.bad,
        TRAIN
    );
    assert!(counts.code_call > counts.code_stdin / 5, "{counts:?}");

    let validation = read(&files.validation);
    assert_eq!(validation.len(), VALIDATION);
    let rows: Vec<&DataRow> = validation.iter().map(|r| r.as_ref().unwrap()).collect();
    let code = rows.iter().filter(|r| r.ability == "code").count();
    assert_eq!(code, VALIDATION / 2);
    assert_eq!(
        rows.iter().filter(|r| r.ability == "math").count(),
        VALIDATION / 2
    );
    assert_eq!(files.stats.validation.bad, 0);
}

#[test]
fn rows_have_the_eurus_schema_prompts_and_ground_truths() {
    let files = standin();
    for path in [&files.train, &files.validation] {
        let file = std::fs::File::open(path).unwrap();
        let builder = ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
        let schema = builder.schema();
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(
            names,
            [
                "data_source",
                "prompt",
                "ability",
                "reward_model",
                "extra_info"
            ]
        );
        let DataType::List(item) = schema.field_with_name("prompt").unwrap().data_type() else {
            panic!("prompt is not a list");
        };
        let DataType::Struct(message) = item.data_type() else {
            panic!("prompt items are not structs");
        };
        let message: Vec<&str> = message.iter().map(|f| f.name().as_str()).collect();
        assert_eq!(message, ["role", "content"]);
        let DataType::Struct(reward) = schema.field_with_name("reward_model").unwrap().data_type()
        else {
            panic!("reward_model is not a struct");
        };
        let reward: Vec<&str> = reward.iter().map(|f| f.name().as_str()).collect();
        assert_eq!(reward, ["style", "ground_truth"]);
    }

    let math_sources = [
        "numina_aops_forum",
        "numina_synthetic_math",
        "numina_amc_aime",
        "numina_synthetic_amc",
        "numina_cn_k12",
        "numina_olympiads",
    ];
    let code_sources = ["apps", "codecontests", "taco", "codeforces"];
    let (mut stdin, mut call) = (0, 0);
    for (i, row) in read(&files.validation).into_iter().enumerate() {
        let row = row.unwrap();
        assert_eq!(row.prompt.len(), 2);
        assert_eq!(row.prompt[0].role, "system");
        assert_eq!(row.prompt[0].content, SYSTEM_PROMPT);
        assert_eq!(row.prompt[1].role, "user");
        assert_eq!(row.reward_model.style, "rule");
        let info = row.extra_info.as_ref().unwrap();
        assert_eq!((info.split.as_str(), info.index), ("validation", i as i64));
        match row.ability.as_str() {
            "math" => {
                assert!(math_sources.contains(&row.data_source.as_str()));
                assert!(user(&row).ends_with(MATH_SUFFIX));
                let answer: i64 = row.reward_model.ground_truth.parse().unwrap();
                assert!((1..=999).contains(&answer));
            }
            "code" => {
                assert!(code_sources.contains(&row.data_source.as_str()));
                assert!(user(&row).ends_with(CODE_SUFFIX));
                let spec: serde_json::Value =
                    serde_json::from_str(&row.reward_model.ground_truth).unwrap();
                let n = spec["inputs"].as_array().unwrap().len();
                assert_eq!(spec["outputs"].as_array().unwrap().len(), n);
                match spec.get("fn_name") {
                    Some(name) => {
                        assert!(name.is_string());
                        call += 1;
                    }
                    None => stdin += 1,
                }
            }
            other => panic!("row {i}: ability {other}"),
        }
    }
    assert!(stdin > 0 && call > 0, "stdin {stdin}, fn_name {call}");
}

#[test]
fn files_are_the_rows_of_the_generator_and_byte_identical_per_seed() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StandinConfig {
        seed: 3,
        train_rows: 2_000,
        validation_rows: 64,
    };
    let a = build_standin(&cfg, &dir.path().join("a"), &|_, _, _| {}).unwrap();
    let b = build_standin(&cfg, &dir.path().join("b"), &|_, _, _| {}).unwrap();
    let other = build_standin(
        &StandinConfig {
            seed: 4,
            ..cfg.clone()
        },
        &dir.path().join("c"),
        &|_, _, _| {},
    )
    .unwrap();
    let bytes = |p: &Path| std::fs::read(p).unwrap();
    for (x, y) in [
        (&a.train, &b.train),
        (&a.validation, &b.validation),
        (&a.stats_file, &b.stats_file),
        (
            &a.tokenizer_dir.join("tokenizer.json"),
            &b.tokenizer_dir.join("tokenizer.json"),
        ),
        (
            &a.tokenizer_dir.join("tokenizer_config.json"),
            &b.tokenizer_dir.join("tokenizer_config.json"),
        ),
    ] {
        assert!(
            bytes(x) == bytes(y),
            "{} differs from {}",
            x.display(),
            y.display()
        );
    }
    assert!(bytes(&a.train) != bytes(&other.train));

    // Row i of the file is standin_row(seed, split, i), whichever chunk made it.
    let rows = read(&a.validation);
    for i in [0, 1, 31, 63] {
        assert_eq!(
            rows[i].as_ref().unwrap(),
            &standin_row(3, StandinSplit::Validation, i).row
        );
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[usize], p: usize) -> usize {
    sorted[(p * sorted.len()).div_ceil(100).max(1) - 1]
}

#[test]
fn prompt_lengths_under_the_trained_tokenizer_are_like_the_real_sets() {
    let files = standin();
    let tokenizer =
        tokenizers::Tokenizer::from_file(files.tokenizer_dir.join("tokenizer.json")).unwrap();
    let vocab = tokenizer.get_vocab_size(true);
    assert!((1_000..=4_096).contains(&vocab), "vocab {vocab}");
    let tokens = |text: &str| encode(&tokenizer, text).unwrap().len();
    let system = tokens(SYSTEM_PROMPT);
    assert!(
        (100..=180).contains(&system),
        "system prompt: {system} tokens"
    );

    let (mut math, mut code, mut code_prompts) = (Vec::new(), Vec::new(), Vec::new());
    let (mut estimated, mut actual) = (0, 0);
    for row in read(&files.train).into_iter().step_by(7).flatten() {
        let question = user(&row);
        // The bad rows (another ability, or a math question marked code) are left out.
        match (
            row.ability.as_str(),
            question.strip_suffix(MATH_SUFFIX),
            question.strip_suffix(CODE_SUFFIX),
        ) {
            ("math", Some(text), _) => math.push(tokens(text)),
            ("code", _, Some(statement)) => {
                code.push(tokens(statement));
                code_prompts.push(tokens(&render_chatml(&row.prompt, true)));
            }
            _ => continue,
        }
        estimated += estimate_tokens(question);
        actual += tokens(question);
    }
    for v in [&mut math, &mut code, &mut code_prompts] {
        v.sort_unstable();
    }
    // The estimate the generator sizes text with is close to the real count.
    let ratio = actual as f64 / estimated as f64;
    assert!((0.9..=1.15).contains(&ratio), "tokens / estimate = {ratio}");

    let share = |v: &[usize], f: &dyn Fn(usize) -> bool| {
        v.iter().filter(|&&x| f(x)).count() as f64 / v.len() as f64
    };
    let math_in_range = share(&math, &|t| (20..=300).contains(&t));
    assert!(
        math_in_range > 0.93,
        "math questions in 20..=300 tokens: {math_in_range}"
    );
    assert!(
        (55..=110).contains(&percentile(&math, 50)),
        "{}",
        percentile(&math, 50)
    );

    assert!(code.len() > 200);
    assert!(
        percentile(&code, 1) >= 170 && percentile(&code, 100) <= 2_400,
        "{code:?}"
    );
    assert!(
        (350..=600).contains(&percentile(&code, 50)),
        "{}",
        percentile(&code, 50)
    );
    let over = share(&code_prompts, &|t| t > 1_024);
    assert!(
        (0.02..=0.2).contains(&over),
        "code prompts over 1,024 tokens: {over}"
    );
}

#[test]
fn reference_responses_earn_full_marks_and_wrong_ones_do_not() {
    let grader = Grader::new(GraderConfig::default());
    let grade = |ability, response: &str, truth: &str| {
        let result = grader.grade_now(&GradeItem {
            id: String::new(),
            ability: Some(ability),
            response: response.to_string(),
            ground_truth: truth.to_string(),
        });
        (result.score, result.reason)
    };

    // Validation rows alternate math and code; 120 rows give 60 of each.
    let rows: Vec<_> = (0..120)
        .map(|i| standin_row(11, StandinSplit::Validation, i))
        .collect();
    let mut families = std::collections::BTreeSet::new();
    let mut forms = std::collections::BTreeSet::new();
    for (i, row) in rows.iter().enumerate() {
        let truth = &row.row.reward_model.ground_truth;
        match row.kind {
            RowKind::Math => {
                let (score, reason) = grade(Ability::Math, &row.reference, truth);
                assert_eq!(score, 1.0, "row {i}: {reason}\n{}", row.reference);
                let wrong = format!("\\boxed{{{}}}", truth.parse::<i64>().unwrap() + 1);
                assert_eq!(grade(Ability::Math, &wrong, truth).0, 0.0);
            }
            RowKind::Code(form) => {
                let (score, reason) = grade(Ability::Code, &row.reference, truth);
                assert_eq!(score, 1.0, "row {i}: {reason}\n{}\n{truth}", row.reference);
                families.insert(row.family.unwrap());
                forms.insert(format!("{form:?}"));
            }
            RowKind::Bad(fault) => panic!("row {i}: validation row with {fault:?}"),
        }
    }
    assert!(families.len() >= 8, "families seen: {families:?}");
    assert_eq!(forms.len(), 2);

    // Tests tell programs apart: a reference scores less than 1 on another family's tests of
    // the same form.
    let code: Vec<_> = rows
        .iter()
        .filter(|r| r.kind == RowKind::Code(CodeForm::Stdin))
        .collect();
    for pair in code
        .windows(2)
        .filter(|p| p[0].family != p[1].family)
        .take(4)
    {
        let (score, _) = grade(
            Ability::Code,
            &pair[0].reference,
            &pair[1].row.reward_model.ground_truth,
        );
        assert!(score < 1.0, "{}", pair[0].reference);
    }
}

#[test]
fn bad_rows_are_rows_of_the_generator_with_one_fault() {
    for (block, fault) in Fault::ALL.into_iter().enumerate() {
        let index = block * 10_000 + BAD_ROW_OFFSET;
        let row = standin_row(0, StandinSplit::Train, index);
        assert_eq!(row.kind, RowKind::Bad(fault));
        let clean = standin_row(0, StandinSplit::Train, index + 1);
        assert!(matches!(clean.kind, RowKind::Math | RowKind::Code(_)));
    }
}
