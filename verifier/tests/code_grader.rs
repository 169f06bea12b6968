//! Code grading end to end in the real sandbox: formats, comparison, partial credit, and
//! attacks that must be contained (each scores 0, ends within its limit, leaves the host alone).

use prime_verifier::code::sandbox::{Backend, Sandbox, SandboxLimits, Termination};
use prime_verifier::code::{extract_code, grade_code, stdout_matches, CodeGraderConfig};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn sandbox() -> &'static Sandbox {
    static SANDBOX: OnceLock<Sandbox> = OnceLock::new();
    SANDBOX.get_or_init(|| {
        let limits = SandboxLimits {
            wall_time: Duration::from_secs(3),
            cpu_seconds: 3,
            ..SandboxLimits::default()
        };
        Sandbox::detect(limits).expect("python3 available")
    })
}

/// The Landlock + seccomp backend with a warm pool of two, forced even where bubblewrap
/// works; `None` (with the reason printed) only where the kernel has no Landlock.
fn landlock_sandbox() -> Option<&'static Sandbox> {
    static SANDBOX: OnceLock<Option<Sandbox>> = OnceLock::new();
    SANDBOX
        .get_or_init(|| {
            Backend::landlock().map(|b| sandbox().clone().with_backend(b).with_warm_pool(2))
        })
        .as_ref()
        .or_else(|| {
            eprintln!("SKIPPED for landlock+seccomp: this kernel has no Landlock (or it is off)");
            None
        })
}

/// Every backend this machine offers: the detected one, then Landlock + seccomp.
fn backends() -> Vec<&'static Sandbox> {
    std::iter::once(sandbox())
        .chain(landlock_sandbox())
        .collect()
}

fn fence(code: &str) -> String {
    format!("Here is my solution:\n```python\n{code}\n```\nDone.")
}

fn grade(code: &str, tests: &str) -> f64 {
    grade_code(
        sandbox(),
        &CodeGraderConfig::default(),
        &fence(code),
        tests,
        None,
    )
    .expect("valid spec")
    .score
}

const ADD_TESTS: &str =
    r#"{"inputs": ["1 2\n", "3 4\n", "10 -5\n"], "outputs": ["3\n", "7\n", "5\n"]}"#;

#[test]
fn stdin_stdout_correct_and_wrong() {
    assert_eq!(
        grade("a, b = map(int, input().split())\nprint(a + b)", ADD_TESTS),
        1.0
    );
    assert_eq!(
        grade("a, b = map(int, input().split())\nprint(a - b)", ADD_TESTS),
        0.0
    );
    // Fails only the third test.
    let partial = "a, b = map(int, input().split())\nprint(a + b if b > 0 else 0)";
    assert!((grade(partial, ADD_TESTS) - 2.0 / 3.0).abs() < 1e-9);
    // Reading all of stdin and an `if __name__` guard work.
    let main_guard = "import sys\ndef main():\n    a, b = map(int, sys.stdin.read().split())\n    print(a + b)\nif __name__ == '__main__':\n    main()";
    assert_eq!(grade(main_guard, ADD_TESTS), 1.0);
}

#[test]
fn partial_credit_counts_the_first_ten() {
    let inputs: Vec<String> = (0..12).map(|i| format!("{i}\n")).collect();
    let outputs: Vec<String> = (0..12).map(|i| format!("{}\n", i * 2)).collect();
    let tests = serde_json::json!({"inputs": inputs, "outputs": outputs}).to_string();
    // Wrong on input 3 only: 9 of the first 10.
    let code = "n = int(input())\nprint(n * 2 if n != 3 else 0)";
    assert!((grade(code, &tests) - 0.9).abs() < 1e-9);
    // Wrong only after the first ten: the spec's rule gives 1.0.
    let late = "n = int(input())\nprint(n * 2 if n < 11 else 0)";
    assert_eq!(grade(late, &tests), 1.0);
    // Binary mode: all or nothing.
    let binary = CodeGraderConfig {
        continuous: false,
        ..CodeGraderConfig::default()
    };
    let v = grade_code(sandbox(), &binary, &fence(late), &tests, None).unwrap();
    assert_eq!(v.score, 0.0);
}

#[test]
fn call_based_functions_and_solution_class() {
    let tests =
        r#"{"fn_name": "add", "inputs": ["1\n2", "[1, 2]\n[3]"], "outputs": [3, [1, 2, 3]]}"#;
    assert_eq!(
        grade(
            "def add(a, b):\n    print('noise')\n    return a + b",
            tests
        ),
        1.0
    );
    let class = r#"{"fn_name": "twoSum", "inputs": [[[2, 7, 11, 15], 9]], "outputs": [[0, 1]]}"#;
    let code = "class Solution:\n    def twoSum(self, nums: List[int], target: int) -> List[int]:\n        seen = {}\n        for i, x in enumerate(nums):\n            if target - x in seen:\n                return (seen[target - x], i)\n            seen[x] = i";
    assert_eq!(grade(code, class), 1.0);
    // `result == expected[0]` is accepted, and ints equal floats by value.
    let wrapped = r#"{"fn_name": "f", "inputs": [[2]], "outputs": [[4.0]]}"#;
    assert_eq!(grade("def f(x):\n    return x * 2", wrapped), 1.0);
    assert_eq!(grade("def f(x):\n    return x * 3", wrapped), 0.0);
    assert_eq!(grade("def g(x):\n    return x * 2", wrapped), 0.0);
}

/// The example of issue 22: outputs written as JSON text, the PRIME/verl form that
/// `prime_code/testing_util.py` (volcengine/verl, verl/utils/reward_score/prime_code/) decodes
/// with `json.loads` before comparing; inputs one JSON value per line.
#[test]
fn call_based_outputs_as_json_text() {
    let tests = r#"{"fn_name": "solve", "inputs": ["1\n2", "[1]\n2", "\"hello\"\n0"], "outputs": ["3", "[1, 2]", "\"olleh\""]}"#;
    let code = "def solve(a, b):\n    if isinstance(a, str):\n        return a[::-1]\n    if isinstance(a, list):\n        return a + [b]\n    return a + b";
    assert_eq!(grade(code, tests), 1.0);
    // A tuple where a list is expected, as the reference converts it.
    let tuple = "def solve(a, b):\n    if isinstance(a, str):\n        return a[::-1]\n    if isinstance(a, list):\n        return tuple(a) + (b,)\n    return a + b";
    assert_eq!(grade(tuple, tests), 1.0);
    // Partial credit: the string case is wrong, 2 of 3.
    let partial = "def solve(a, b):\n    if isinstance(a, str):\n        return a\n    if isinstance(a, list):\n        return a + [b]\n    return a + b";
    assert!((grade(partial, tests) - 2.0 / 3.0).abs() < 1e-9);
    // The JSON text of a string is not the string's own text: "3" is the integer 3.
    assert!((grade("def solve(a, b):\n    return str(a + b) if not isinstance(a, (str, list)) else (a[::-1] if isinstance(a, str) else a + [b])", tests) - 2.0 / 3.0).abs() < 1e-9);
}

/// Floats, booleans, nested lists, None and dicts in the JSON-text form, for a plain function
/// and a `class Solution` method.
#[test]
fn call_based_value_kinds() {
    let mean = r#"{"fn_name": "mean", "inputs": ["[1, 2, 3, 4]", "[1, 2]", "[5]"], "outputs": ["2.5", "1.5", "5.0"]}"#;
    assert_eq!(
        grade("def mean(xs):\n    return sum(xs) / len(xs)", mean),
        1.0
    );
    // 5 == 5.0 in Python: an int where a float is written still passes.
    assert_eq!(grade("def mean(xs):\n    s = sum(xs)\n    return s // len(xs) if s % len(xs) == 0 else s / len(xs)", mean), 1.0);
    // Float equality is exact, as in the reference.
    assert!(
        grade(
            "def mean(xs):\n    return round(sum(xs) / len(xs) + 1e-9, 12)",
            mean
        ) < 1.0
    );

    let even = r#"{"fn_name": "isEven", "inputs": ["4", "7"], "outputs": ["true", "false"]}"#;
    let method =
        "class Solution:\n    def isEven(self, n: int) -> bool:\n        return n % 2 == 0";
    assert_eq!(grade(method, even), 1.0);
    // Python's True == 1, as the reference compares.
    assert_eq!(
        grade("def isEven(n):\n    return int(n % 2 == 0)", even),
        1.0
    );
    assert_eq!(
        grade(
            "def isEven(n):\n    return 'true' if n % 2 == 0 else 'false'",
            even
        ),
        0.0
    );

    let pairs =
        r#"{"fn_name": "pairs", "inputs": ["[1, 2, 3]"], "outputs": ["[[1, 2], [1, 3], [2, 3]]"]}"#;
    // A list of tuples where a list of lists is expected.
    assert_eq!(grade("from itertools import combinations\ndef pairs(xs):\n    return list(combinations(xs, 2))", pairs), 1.0);
    assert_eq!(
        grade(
            "def pairs(xs):\n    return [[a, b] for a in xs for b in xs if a < b]",
            pairs
        ),
        1.0
    );
    assert_eq!(
        grade(
            "def pairs(xs):\n    return [[b, a] for a in xs for b in xs if a < b]",
            pairs
        ),
        0.0
    );
    // A set is never equal to a list.
    assert_eq!(
        grade(
            "def pairs(xs):\n    return {(a, b) for a in xs for b in xs if a < b}",
            pairs
        ),
        0.0
    );

    let find = r#"{"fn_name": "find", "inputs": ["[1, 2]\n3", "{\"a\": 1}\n\"a\""], "outputs": ["null", "1"]}"#;
    assert_eq!(
        grade(
            "def find(c, k):\n    return c.get(k) if isinstance(c, dict) else None",
            find
        ),
        1.0
    );
    let counts = r#"{"fn_name": "counts", "inputs": ["\"abca\""], "outputs": ["{\"a\": 2, \"b\": 1, \"c\": 1}"]}"#;
    assert_eq!(
        grade("def counts(s):\n    return dict(Counter(s))", counts),
        1.0
    );
}

/// The reference looks the method up on `Solution()` when the code defines that class, even
/// where the prelude's wildcard imports bind the same name (`operator.add` here).
#[test]
fn solution_method_wins_over_prelude_names() {
    let tests = r#"{"fn_name": "add", "inputs": ["2\n3"], "outputs": ["-1"]}"#;
    let code = "class Solution:\n    def add(self, a, b):\n        return a - b";
    assert_eq!(grade(code, tests), 1.0);
}

/// LiveCodeBench test 510 (`occurrencesOfElement`), as published in volcengine/verl
/// tests/utils/reward_score/reward_score/test_sandbox_fusion_on_cpu.py
/// (`test_fn_name_success_single_case`): newline-separated JSON arguments, JSON-text outputs.
/// The solution is our own.
#[test]
fn livecodebench_call_based_case_from_verl() {
    let tests = r#"{"fn_name": "occurrencesOfElement", "inputs": ["[1, 3, 1, 7]\n[1, 3, 2, 4]\n1", "[1, 2, 3]\n[10]\n5"], "outputs": ["[0, -1, 2, -1]", "[-1]"]}"#;
    let code = "class Solution:\n    def occurrencesOfElement(self, nums: List[int], queries: List[int], x: int) -> List[int]:\n        at = [i for i, v in enumerate(nums) if v == x]\n        return [at[q - 1] if q <= len(at) else -1 for q in queries]";
    assert_eq!(grade(code, tests), 1.0);
    let off_by_one = "class Solution:\n    def occurrencesOfElement(self, nums, queries, x):\n        at = [i for i, v in enumerate(nums) if v == x]\n        return [at[q] if q < len(at) else -1 for q in queries]";
    assert_eq!(grade(off_by_one, tests), 0.5);
}

/// The APPS form (hendrycks/apps eval/testing_util.py, whose call-based branch calls
/// `method(*inputs)` and also accepts `output == outputs[index][0]`): arguments as arrays,
/// each expected value wrapped in a one-element list, a dict argument whose string keys are
/// turned back into integers.
#[test]
fn apps_call_based_forms() {
    let tests = r#"{"fn_name": "reverse_words", "inputs": [["hello world"], ["a b c"]], "outputs": [["world hello"], ["c b a"]]}"#;
    assert_eq!(
        grade(
            "def reverse_words(s):\n    return ' '.join(s.split()[::-1])",
            tests
        ),
        1.0
    );
    // Outputs that are all strings holding JSON are JSON text (the PRIME form): "3" is 3.
    let text = r#"{"fn_name": "f", "inputs": [[3]], "outputs": ["3"]}"#;
    assert_eq!(grade("def f(n):\n    return n", text), 1.0);
    assert_eq!(grade("def f(n):\n    return str(n)", text), 0.0);
    // With a string that is not JSON among them, strings are Python strings.
    let mixed = r#"{"fn_name": "f", "inputs": [[3], [4]], "outputs": ["x", "3"]}"#;
    assert_eq!(
        grade("def f(n):\n    return 'x' if n == 3 else '3'", mixed),
        1.0
    );
    let keyed = r#"{"fn_name": "total", "inputs": [[{"1": 10, "2": 20}]], "outputs": [[33]]}"#;
    assert_eq!(
        grade(
            "def total(d):\n    return sum(k + v for k, v in d.items())",
            keyed
        ),
        1.0
    );
    // A dict returned with integer keys against JSON's string keys.
    let inverse = r#"{"fn_name": "inv", "inputs": [[{"a": 1}]], "outputs": [{"1": "a"}]}"#;
    assert_eq!(
        grade(
            "def inv(d):\n    return {v: k for k, v in d.items()}",
            inverse
        ),
        1.0
    );
}

/// A call that raises, a missing function and a time-out fail their test; the rest still count.
#[test]
fn call_based_failures_count_per_test() {
    let tests =
        r#"{"fn_name": "reciprocal", "inputs": ["2", "0", "4"], "outputs": ["0.5", "0", "0.25"]}"#;
    let code = "def reciprocal(x):\n    return 1 / x";
    let v = grade_code(
        sandbox(),
        &CodeGraderConfig::default(),
        &fence(code),
        tests,
        None,
    )
    .unwrap();
    assert!((v.score - 2.0 / 3.0).abs() < 1e-9, "{}", v.reason);
    assert!(v.reason.contains("runtime error"), "{}", v.reason);
    assert_eq!(grade("def other(x):\n    return 1 / x", tests), 0.0);
    assert_eq!(
        grade(
            "class Solution:\n    def other(self, x):\n        return 1 / x",
            tests
        ),
        0.0
    );
}

#[test]
fn compile_errors_and_missing_code_score_zero() {
    assert_eq!(grade("def broken(:\n  pass", ADD_TESTS), 0.0);
    let v = grade_code(sandbox(), &CodeGraderConfig::default(), "", ADD_TESTS, None).unwrap();
    assert_eq!(v.score, 0.0);
    assert!(grade_code(
        sandbox(),
        &CodeGraderConfig::default(),
        "x",
        "not json",
        None
    )
    .is_err());
    assert!(grade_code(
        sandbox(),
        &CodeGraderConfig::default(),
        "x",
        r#"{"inputs": [], "outputs": []}"#,
        None
    )
    .is_err());
}

#[test]
fn extraction_takes_the_last_python_block() {
    let r = "```python\nprint(1)\n```\nBetter:\n```python\nprint(2)\n```";
    assert_eq!(extract_code(r).trim(), "print(2)");
    assert_eq!(extract_code("print(3)"), "print(3)");
    assert_eq!(extract_code("```python\nprint(4)").trim(), "print(4)");
}

#[test]
fn stdout_comparison_rules() {
    assert!(stdout_matches("3\n", "3"));
    assert!(stdout_matches("1 2\n3  \n", "1 2\n3\n"));
    assert!(stdout_matches("a\n\nb\n", "a\nb"));
    assert!(stdout_matches("0.3333333\n", "0.33333333"));
    assert!(!stdout_matches("0.34\n", "0.33"));
    assert!(!stdout_matches("1 2 3\n", "1\n2\n3"));
    assert!(!stdout_matches("YES", "NO"));
    assert!(!stdout_matches("", "1"));
}

/// Tokens printed on one line where one per line is expected get no credit: the reference's
/// whitespace-token-set stage never succeeds (spec 8.3).
#[test]
fn stdin_tokens_on_one_line_get_no_credit() {
    let tests = r#"{"inputs": ["3\n"], "outputs": ["1\n2\n3\n"]}"#;
    assert_eq!(
        grade("n = int(input())\nprint(*range(1, n + 1))", tests),
        0.0
    );
    assert_eq!(
        grade(
            "n = int(input())\nprint(*range(1, n + 1), sep='\\n')",
            tests
        ),
        1.0
    );
    assert_eq!(
        grade(
            "n = int(input())\nfor i in range(1, n + 1):\n    print(i, '  ')",
            tests
        ),
        1.0
    );
    // A float line within np.allclose tolerance; several numbers on one line are not.
    let floats = r#"{"inputs": ["2\n"], "outputs": ["0.6666667\n"]}"#;
    assert_eq!(grade("print(int(input()) / 3)", floats), 1.0);
    let pair = r#"{"inputs": ["2\n"], "outputs": ["0.6666667 1\n"]}"#;
    assert_eq!(grade("print(int(input()) / 3, 1)", pair), 0.0);
}

/// The king's-path problem of volcengine/verl tests/utils/reward_score/test_sandbox_on_cpu.py
/// (`prime_code_gts`, Codeforces 242C): the reference scores a correct program 1.0 and 0.9 when
/// the fourth of eleven expected outputs is changed. Test data from there; the program is ours.
#[test]
fn verl_published_stdin_case() {
    let inputs = [
        "5 7 6 11\n3\n5 3 8\n6 7 11\n5 2 5\n",
        "3 4 3 10\n3\n3 1 4\n4 5 9\n3 10 10\n",
        "1 1 2 10\n2\n1 1 3\n2 6 10\n",
        "9 8 7 8\n9\n10 6 6\n10 6 6\n7 7 8\n9 5 6\n8 9 9\n9 5 5\n9 8 8\n8 5 6\n9 10 10\n",
        "6 15 7 15\n9\n6 15 15\n7 14 14\n6 15 15\n9 14 14\n7 14 16\n6 15 15\n6 15 15\n7 14 14\n8 15 15\n",
        "13 16 20 10\n18\n13 16 16\n20 10 10\n19 10 10\n12 15 15\n20 10 10\n18 11 11\n19 10 10\n19 10 10\n20 10 10\n19 10 10\n20 10 10\n20 10 10\n19 10 10\n18 11 11\n13 16 16\n12 15 15\n19 10 10\n19 10 10\n",
        "89 29 88 30\n16\n87 31 31\n14 95 95\n98 88 89\n96 88 88\n14 97 97\n13 97 98\n100 88 88\n88 32 32\n99 88 89\n90 29 29\n87 31 31\n15 94 96\n89 29 29\n88 32 32\n97 89 89\n88 29 30\n",
        "30 14 39 19\n31\n35 7 11\n37 11 12\n32 13 13\n37 5 6\n46 13 13\n37 14 14\n31 13 13\n43 13 19\n45 15 19\n46 13 13\n32 17 17\n41 14 19\n30 14 14\n43 13 17\n34 16 18\n44 11 19\n38 13 13\n40 12 20\n37 16 18\n46 16 18\n34 10 14\n36 9 10\n36 15 19\n38 15 19\n42 13 19\n33 14 15\n35 15 19\n33 17 18\n39 12 20\n36 5 7\n45 12 12\n",
        "2 1 1 1\n2\n1 1 2\n2 1 2\n",
        "1 1 1 2\n5\n1000000000 1 10000\n19920401 1188 5566\n1000000000 1 10000\n1 1 10000\n5 100 200\n",
        "1 1 1000000000 2\n5\n1000000000 1 10000\n19920401 1188 5566\n1000000000 1 10000\n1 1 10000\n5 100 200\n",
    ];
    let outputs = [
        "4\n", "6\n", "-1\n", "2\n", "1\n", "-1\n", "1\n", "9\n", "1\n", "1\n", "-1\n",
    ];
    let code = "import sys\nfrom collections import deque\n\ndef solve():\n    nums = list(map(int, sys.stdin.read().split()))\n    sx, sy, tx, ty, n = nums[:5]\n    cells = set()\n    for k in range(n):\n        r, a, b = nums[5 + 3 * k: 8 + 3 * k]\n        cells.update((r, c) for c in range(a, b + 1))\n    dist = {(sx, sy): 0}\n    queue = deque([(sx, sy)])\n    while queue:\n        x, y = queue.popleft()\n        if (x, y) == (tx, ty):\n            return dist[(x, y)]\n        for dx in (-1, 0, 1):\n            for dy in (-1, 0, 1):\n                nxt = (x + dx, y + dy)\n                if nxt in cells and nxt not in dist:\n                    dist[nxt] = dist[(x, y)] + 1\n                    queue.append(nxt)\n    return -1\n\nif __name__ == '__main__':\n    print(solve())";
    let tests = serde_json::json!({"inputs": inputs, "outputs": outputs}).to_string();
    assert_eq!(grade(code, &tests), 1.0);
    let mut changed = outputs;
    changed[3] = "-1\n";
    let tests = serde_json::json!({"inputs": inputs, "outputs": changed}).to_string();
    assert!((grade(code, &tests) - 0.9).abs() < 1e-9);
}

/// Stdin forms: `None` and "" as empty stdin (volcengine/verl
/// tests/utils/reward_score/reward_score/test_sandbox_fusion_on_cpu.py,
/// `test_none_and_empty_stdin_passed_correctly`), exact `sys.stdin.read()` input with a
/// trailing newline expected (its `INPUT_OUTPUT_VALID`), and APPS's lists of lines for inputs
/// and outputs (hendrycks/apps eval/testing_util.py joins both with newlines).
#[test]
fn stdin_input_forms() {
    let empty = r#"{"inputs": [null, "", "hello"], "outputs": ["You said ''", "You said ''", "You said 'hello'"]}"#;
    assert_eq!(
        grade(
            "import sys\nprint(f\"You said '{sys.stdin.readline().strip()}'\")",
            empty
        ),
        1.0
    );
    let exact = r#"{"inputs": ["input1", "input2"], "outputs": ["output1\n", "output2\n"]}"#;
    assert_eq!(grade("import sys\ndata = sys.stdin.read()\nprint({'input1': 'output1', 'input2': 'output2'}.get(data, 'unexpected'))", exact), 1.0);
    assert_eq!(grade("print('wrong_output')", exact), 0.0);
    let lines = r#"{"inputs": [["2", "3 4"]], "outputs": [["7", "12"]]}"#;
    assert_eq!(
        grade(
            "input()\na, b = map(int, input().split())\nprint(a + b)\nprint(a * b)",
            lines
        ),
        1.0
    );
}

/// Runs an attack as a stdin problem whose only correct output is "ok" and checks it scores 0
/// within its limit.
fn contained(name: &str, code: &str) {
    for sb in backends() {
        contained_in(sb, name, code);
    }
}

fn contained_in(sb: &Sandbox, name: &str, code: &str) {
    let tests = r#"{"inputs": [""], "outputs": ["unreachable-expected-output"]}"#;
    let backend = sb.backend().name();
    let start = Instant::now();
    let score = grade_code(sb, &CodeGraderConfig::default(), &fence(code), tests, None)
        .expect("valid spec")
        .score;
    let took = start.elapsed();
    assert_eq!(score, 0.0, "{name} scored under {backend}");
    assert!(
        took < Duration::from_secs(20),
        "{name} took {took:?} under {backend}"
    );
}

/// Grades `code` against `tests` in `sb`.
fn grade_in(sb: &Sandbox, code: &str, tests: &str) -> f64 {
    grade_code(sb, &CodeGraderConfig::default(), &fence(code), tests, None)
        .expect("valid spec")
        .score
}

#[test]
fn attack_infinite_loop_and_sleep() {
    contained("infinite loop", "while True:\n    pass");
    contained("long sleep", "import time\ntime.sleep(3600)");
}

#[test]
fn attack_fork_bomb() {
    // As root, only a pids cgroup bounds the process count (RLIMIT_NPROC does not bind root);
    // without one, running a fork bomb would endanger the test machine itself.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 && !sandbox().has_cgroup() {
        eprintln!("SKIPPED fork bomb: running as root without a writable cgroup (RLIMIT_NPROC does not bind root)");
        return;
    }
    contained(
        "fork bomb",
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
    );
    // The host still forks fine afterwards.
    assert!(std::process::Command::new("true")
        .status()
        .unwrap()
        .success());
}

#[test]
fn attack_memory_bomb() {
    contained(
        "memory bomb",
        "x = []\nwhile True:\n    x.append(bytearray(50 * 1024 * 1024))",
    );
}

#[test]
fn attack_huge_output_is_capped() {
    contained(
        "huge output",
        "import sys\nchunk = 'x' * (1 << 20)\nwhile True:\n    sys.stdout.write(chunk)",
    );
}

#[test]
fn attack_disk_fill_and_fd_exhaustion() {
    contained(
        "disk fill",
        "f = open('big', 'wb')\nwhile True:\n    f.write(b'x' * (1 << 20))",
    );
    contained(
        "fd exhaustion",
        "fs = []\nwhile True:\n    fs.append(open('/dev/null'))",
    );
}

#[test]
fn attack_segfault_and_deep_recursion() {
    contained("ctypes segfault", "import ctypes\nctypes.string_at(0)");
    contained(
        "deep recursion",
        "def f(n):\n    return f(n + 1) + 1\nprint(f(0))",
    );
}

#[test]
fn attack_daemon_does_not_outlive_the_run() {
    // A daemon that leaves the process group is caught by the pid namespace (bubblewrap) or
    // the run's cgroup; the bare rlimit backend has neither.
    if sandbox().backend() == &Backend::Rlimits && !sandbox().has_cgroup() {
        eprintln!("SKIPPED daemon attack: rlimits backend without a writable cgroup");
        return;
    }
    let marker = std::env::temp_dir().join(format!("prime-daemon-{}", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    // The daemon double-forks, leaves the session, and tries to write a host file later.
    let code = format!(
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(1.5)\n        open({path:?}, 'w').write('escaped')\n        os._exit(0)\n    os._exit(0)\nprint('parent done')",
        path = marker.display().to_string()
    );
    contained("daemon", &code);
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        !marker.exists(),
        "a daemon outlived the run and wrote {marker:?}"
    );
}

/// The backends that isolate files, network and other processes: bubblewrap (where it is
/// usable) and Landlock + seccomp. The rlimit-only fallback promises none of that. Says why
/// when a backend is missing here.
fn isolating_backends() -> Vec<&'static Sandbox> {
    let mut out = Vec::new();
    if matches!(sandbox().backend(), Backend::Bubblewrap { .. }) {
        out.push(sandbox());
    } else {
        eprintln!(
            "SKIPPED for bubblewrap: detected backend is {} (bwrap missing or user namespaces off)",
            sandbox().backend().name()
        );
    }
    out.extend(landlock_sandbox());
    out
}

#[test]
fn attack_host_files_and_environment_are_invisible() {
    let secret_dir = tempfile::tempdir().unwrap();
    let secret = secret_dir.path().join("secret.txt");
    std::fs::write(&secret, "host secret").unwrap();
    let grader_pid = std::process::id();
    // The Python installation is visible on purpose (read-only): its path's components are
    // expected in listings.
    let python_parts: Vec<String> = sandbox()
        .python()
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    for sb in isolating_backends() {
        // Contents of host files, directory listings, and any process's environment
        // (bubblewrap's init and the grader's own) must be out of reach; so must the
        // grader's variables in the program's own environment.
        let code = format!(
            "import os\nleak = []\nfor p in [{secret:?}, '/etc/passwd', '/etc/hostname', '/root/.bashrc', '/proc/1/environ', '/proc/{grader_pid}/environ', '/work/../etc/shadow']:\n    try:\n        if open(p, 'rb').read():\n            leak.append(p)\n    except Exception:\n        pass\nfor d in ['/', '/etc', '/home', '/root', '/tmp']:\n    try:\n        if any(n not in ('work', 'usr', 'bin', 'sbin', 'lib', 'lib64', 'lib32', 'libx32', 'proc', 'dev', 'tmp', 'etc', 'ld.so.cache', *{python_parts:?}) for n in os.listdir(d)):\n            leak.append(d)\n    except Exception:\n        pass\nif 'CARGO' in str(os.environ) or len(os.environ) > 4:\n    leak.append('environ')\nprint('LEAK', leak) if leak else print('SAFE')",
            secret = secret.display().to_string()
        );
        let out = sb.run(&code, b"").unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "SAFE",
            "{} leaked host state ({})",
            sb.backend().name(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Under bubblewrap the host paths do not even exist.
    if matches!(sandbox().backend(), Backend::Bubblewrap { .. }) {
        let code = "import os\nprint('LEAK' if any(os.path.exists(p) for p in ['/etc/passwd', '/home', '/root/.cargo']) else 'SAFE')";
        assert_eq!(grade(code, r#"{"inputs": [""], "outputs": ["SAFE"]}"#), 1.0);
    }
}

#[test]
fn attack_writes_outside_and_killing_others() {
    for sb in isolating_backends() {
        // Landlock scopes signals from ABI 6 (Linux 6.12); before that a same-uid process
        // could be signalled, so only the write is checked there.
        let check_kill = match sb.backend() {
            Backend::Landlock { abi } if *abi < 6 => {
                eprintln!("SKIPPED kill check for landlock+seccomp: Landlock ABI {abi} < 6");
                false
            }
            _ => true,
        };
        let target = std::env::temp_dir().join(format!(
            "prime-outside-{}-{}",
            std::process::id(),
            sb.backend().name()
        ));
        let mut victim = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let code = format!(
            "import os, signal\nfor p in [{target:?}, '/tmp/prime-outside-x', os.path.expanduser('~/../escape')]:\n    try:\n        open(p, 'w').write('x')\n    except Exception:\n        pass\ntry:\n    os.kill({victim}, signal.SIGKILL)\nexcept Exception:\n    pass\nfor pid in range(2, 500):\n    try:\n        os.kill(pid, signal.SIGKILL)\n    except Exception:\n        pass",
            target = target.display().to_string(),
            victim = victim.id()
        );
        contained_in(sb, "outside write and kill", &code);
        assert!(
            !target.exists(),
            "{} wrote outside the work dir",
            sb.backend().name()
        );
        if check_kill {
            assert!(
                victim.try_wait().unwrap().is_none(),
                "{} killed a host process",
                sb.backend().name()
            );
        }
        let _ = victim.kill();
        victim.wait().unwrap();
    }
}

#[test]
fn attack_network_is_unreachable() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let code = format!(
        "import socket\nreached = []\nfor addr in [('127.0.0.1', {port}), ('1.1.1.1', 53), ('8.8.8.8', 443)]:\n    try:\n        s = socket.create_connection(addr, timeout=1)\n        reached.append(addr)\n    except Exception:\n        pass\ntry:\n    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n    u.sendto(b'x', ('1.1.1.1', 53))\n    reached.append('udp')\nexcept Exception:\n    pass\nprint('REACHED', reached) if reached else print('ISOLATED')"
    );
    let tests = r#"{"inputs": [""], "outputs": ["ISOLATED"]}"#;
    for sb in isolating_backends() {
        assert_eq!(
            grade_in(sb, &code, tests),
            1.0,
            "{} reached the network",
            sb.backend().name()
        );
    }
}

#[test]
fn landlock_seccomp_blocks_namespaces_ptrace_and_new_sessions() {
    let Some(sb) = landlock_sandbox() else {
        return;
    };
    // Each escape hatch must fail inside the sandbox; the program lists what worked.
    let code = "import os, ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nworked = []\nif libc.unshare(0x10000000) == 0:\n    worked.append('unshare-user')\nif libc.unshare(0x40000000) == 0:\n    worked.append('unshare-net')\nif libc.ptrace(16, 1, 0, 0) == 0:\n    worked.append('ptrace')\ntry:\n    os.setsid()\n    worked.append('setsid')\nexcept OSError:\n    pass\nif libc.syscall(425, 8, 0) >= 0:\n    worked.append('io_uring')\nprint('ESCAPED', worked) if worked else print('CONFINED')";
    let tests = r#"{"inputs": [""], "outputs": ["CONFINED"]}"#;
    let v = grade_code(sb, &CodeGraderConfig::default(), &fence(code), tests, None).unwrap();
    assert_eq!(v.score, 1.0, "landlock+seccomp let through: {}", v.reason);
    // And ordinary programs still work there: threads, subprocesses, temp files.
    let ok = "import threading, subprocess, tempfile, sys\nt = threading.Thread(target=lambda: None)\nt.start(); t.join()\nout = subprocess.run([sys.executable, '-c', 'print(2 + 2)'], capture_output=True, text=True).stdout.strip()\nwith tempfile.TemporaryFile() as f:\n    f.write(b'x')\nprint(out)";
    let tests = r#"{"inputs": [""], "outputs": ["4"]}"#;
    let v = grade_code(sb, &CodeGraderConfig::default(), &fence(ok), tests, None).unwrap();
    assert_eq!(v.score, 1.0, "an ordinary program failed: {}", v.reason);
}

#[test]
fn rlimit_fallback_still_contains_runaway_code() {
    let fallback = sandbox().clone().with_backend(Backend::Rlimits);
    let tests = r#"{"inputs": ["2\n"], "outputs": ["4\n"]}"#;
    let cfg = CodeGraderConfig::default();
    let ok = grade_code(
        &fallback,
        &cfg,
        &fence("print(int(input()) * 2)"),
        tests,
        None,
    )
    .unwrap();
    assert_eq!(ok.score, 1.0);
    let start = Instant::now();
    let looping = grade_code(&fallback, &cfg, &fence("while True: pass"), tests, None).unwrap();
    assert_eq!(looping.score, 0.0);
    assert!(start.elapsed() < Duration::from_secs(10));
    let env = grade_code(
        &fallback,
        &cfg,
        &fence(
            "import os\nprint(4 if 'CARGO' not in str(os.environ) and len(os.environ) <= 4 else 5)",
        ),
        tests,
        None,
    )
    .unwrap();
    assert_eq!(
        env.score, 1.0,
        "grader environment leaked into the fallback sandbox"
    );
}

#[test]
fn deadline_stops_remaining_tests() {
    let tests = r#"{"inputs": ["", "", "", ""], "outputs": ["x", "x", "x", "x"]}"#;
    let start = Instant::now();
    let deadline = start + Duration::from_millis(1500);
    let v = grade_code(
        sandbox(),
        &CodeGraderConfig::default(),
        &fence("while True: pass"),
        tests,
        Some(deadline),
    )
    .unwrap();
    assert_eq!(v.score, 0.0);
    assert!(
        v.tests_run < 4,
        "ran {} tests past the deadline",
        v.tests_run
    );
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "took {:?}",
        start.elapsed()
    );
}

#[test]
fn warm_pool_runs_are_fresh_and_isolated() {
    let pooled = sandbox().clone().with_warm_pool(2);
    assert_eq!(pooled.warm_pool_size(), 2);
    // A shorter wall clock keeps the pool; other limits restart it with the same size.
    let mut limits = pooled.limits().clone();
    limits.wall_time = Duration::from_secs(1);
    assert_eq!(
        pooled.clone().with_limits(limits.clone()).warm_pool_size(),
        2
    );
    limits.max_open_files = 32;
    assert_eq!(pooled.clone().with_limits(limits).warm_pool_size(), 2);
    for sb in [&pooled, landlock_sandbox().unwrap_or(&pooled)] {
        let backend = sb.backend().name();
        // Each run leaves a file, a variable and a background process behind; the next run
        // must see none of them, and see its own stdin and `__name__`.
        for i in 0..4 {
            let program = "import os, sys, subprocess\nseen = [p for p in ('leftover.txt',) if os.path.exists(p)]\nopen('leftover.txt', 'w').write('x')\nif 'marker' in globals():\n    seen.append('globals')\nmarker = 1\nsubprocess.Popen(['sleep', '30'])\nprint(__name__, sys.argv[0], sys.stdin.read().strip(), seen)";
            let stdin = format!("run-{i}");
            let out = sb.run(program, stdin.as_bytes()).unwrap();
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                format!("__main__ main.py run-{i} []"),
                "{backend}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // A program that fails to compile reports it as python would.
        let out = sb.run("def broken(:\n", b"").unwrap();
        assert_eq!(out.termination, Termination::Exited(1), "{backend}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("SyntaxError"),
            "{backend}"
        );
    }
}

#[test]
fn status_reports_the_active_backend() {
    use prime_verifier::{Grader, GraderConfig};
    let detected = Grader::with_sandbox(GraderConfig::default(), Some(sandbox().clone()));
    assert_eq!(
        detected.status().sandbox_backend,
        sandbox().backend().name()
    );
    if let Some(sb) = landlock_sandbox() {
        let g = Grader::with_sandbox(GraderConfig::default(), Some(sb.clone()));
        assert_eq!(g.status().sandbox_backend, "landlock+seccomp");
    }
    let none = Grader::with_sandbox(GraderConfig::default(), None);
    assert_eq!(none.status().sandbox_backend, "unavailable");
}
