use super::*;
use crate::value::MAX_DEPTH;
use serde_json::json;

const _: () = {
    const fn assert_send_sync_clone<T: Send + Sync + Clone>() {}
    assert_send_sync_clone::<Program>();
};

fn check(program: &str, input: Value, expected: Value) {
    let compiled = Program::compile(program).expect("program compiles");
    assert_eq!(
        compiled.run(input).expect("program runs"),
        expected,
        "program {program:?}"
    );
}

fn run_err(program: &str, input: Value) -> RunError {
    Program::compile(program)
        .expect("program compiles")
        .run(input)
        .expect_err("program fails")
}

fn compile_err(program: &str) -> String {
    Program::compile(program)
        .expect_err("program does not compile")
        .message
}

#[test]
fn runs_basic_programs() {
    check(
        ".",
        json!({"a": [1, "x", null, true]}),
        json!({"a": [1, "x", null, true]}),
    );
    check(".a.b", json!({"a": {"b": 7}}), json!(7));
    check(".a.b", json!({}), json!(null));
    check(
        "map(select(.qty > 0))",
        json!([{"qty": 1}, {"qty": 0}, {"qty": 3}]),
        json!([{"qty": 1}, {"qty": 3}]),
    );
    check(
        "map(.price) | add",
        json!([{"price": 2}, {"price": 5}]),
        json!(7),
    );
    check("{a: .x}", json!({"x": [1]}), json!({"a": [1]}));
    check("length", json!([1, 2, 3]), json!(3));
    check("length", json!("héllo"), json!(5));
    check("keys", json!({"b": 1, "a": 2}), json!(["a", "b"]));
    check(
        "to_entries",
        json!({"a": 1}),
        json!([{"key": "a", "value": 1}]),
    );
    check("tostring", json!([1, "a"]), json!("[1,\"a\"]"));
    check("tojson", json!({"a": "b"}), json!("{\"a\":\"b\"}"));
    check(".x | fromjson", json!({"x": "[1,2]"}), json!([1, 2]));
    check("[.[] | . * 2]", json!([1, 2]), json!([2, 4]));
    check(
        "if . then \"yes\" else \"no\" end",
        json!(false),
        json!("no"),
    );
    check("\"\\(.a)-\\(.b)\"", json!({"a": 1, "b": "x"}), json!("1-x"));
}

#[test]
fn several_outputs_become_an_array_and_none_become_null() {
    check(
        ".[]",
        json!([1, "two", {"three": 3}]),
        json!([1, "two", {"three": 3}]),
    );
    check(".[]", json!([5]), json!(5));
    check("empty", json!({"a": 1}), json!(null));
    check(".[]", json!([]), json!(null));
    let outputs = Program::compile(".[]")
        .expect("compiles")
        .run_all(json!([1, 2]), 10);
    assert_eq!(outputs.expect("runs"), vec![json!(1), json!(2)]);
}

#[test]
fn strings_round_trip() {
    let text = "quote \" backslash \\ newline \n tab \t nul \u{0} bell \u{7} é 中文 🎉";
    check(".", json!(text), json!(text));
    check(".s", json!({"s": text}), json!(text));
    check("{(.k): 1}", json!({"k": "ключ 🔑"}), json!({"ключ 🔑": 1}));
    check("\"a\\u00e9\\n\"", json!(null), json!("aé\n"));
    check("ascii_downcase", json!("ÀBC"), json!("Àbc"));
}

#[test]
fn numbers_round_trip() {
    check(
        ".",
        json!(9_007_199_254_740_993_i64),
        json!(9_007_199_254_740_993_i64),
    );
    check(".", json!(u64::MAX), json!(u64::MAX));
    check(".", json!(i64::MIN), json!(i64::MIN));
    check(
        ".a + 1",
        json!({"a": 9_007_199_254_740_993_i64}),
        json!(9_007_199_254_740_994_i64),
    );
    check(".", json!(0.1), json!(0.1));
    check(".", json!(-1.5e300), json!(-1.5e300));
    check(".", json!(2.0), json!(2.0));
    check(". * 2", json!(1.25), json!(2.5));
    check("1.5", json!(null), json!(1.5));
    check("4 / 2", json!(null), json!(2.0));
    check("[.[] | floor]", json!([1.7, -1.2]), json!([1, -2]));
}

#[test]
fn non_finite_and_huge_numbers_map_like_jq() {
    check("nan", json!(null), json!(null));
    check(
        "[infinite, -infinite]",
        json!(null),
        json!([f64::MAX, f64::MIN]),
    );
    check("1e1000", json!(null), json!(f64::MAX));
    check("100000000000000000000000000000", json!(null), json!(1e29));
}

#[test]
fn runtime_errors_fail() {
    let error = run_err("error(\"boom\")", json!(null));
    assert!(
        matches!(&error, RunError::Failed(m) if m.contains("boom")),
        "{error:?}"
    );
    assert_eq!(error.to_string(), "boom");
    let error = run_err(".a", json!(1));
    assert!(matches!(error, RunError::Failed(_)), "{error:?}");
    let error = run_err("error({code: 1})", json!(null));
    assert_eq!(error, RunError::Failed("{\"code\":1}".to_owned()));
    let error = run_err("1, error(\"late\")", json!(null));
    assert_eq!(error, RunError::Failed("late".to_owned()));
    check("try error(\"x\") catch .", json!(null), json!("x"));
    check(".a?", json!(1), json!(null));
}

#[test]
fn halt_ends_the_program_without_exiting() {
    check("1, halt, 2", json!(null), json!(1));
    let error = run_err("halt_error", json!("bye"));
    assert_eq!(
        error,
        RunError::Failed("jq program halted with exit code 5".to_owned())
    );
}

#[test]
fn non_json_outputs_are_rejected() {
    let error = run_err("tobytes", json!("ab"));
    assert!(matches!(error, RunError::NotJson(_)), "{error:?}");
    assert!(
        error
            .to_string()
            .starts_with("jq output is not JSON: byte string")
    );
    let error = run_err("{(1): 2}", json!(null));
    assert_eq!(
        error,
        RunError::NotJson("object key `1` is not a string".to_owned())
    );
    check("tobytes | tostring", json!("ab"), json!("ab"));
}

#[test]
fn output_limit_is_enforced() {
    let program = Program::compile("repeat(1)").expect("compiles");
    assert_eq!(
        program.run_all(json!(null), 10),
        Err(RunError::TooManyOutputs(10))
    );
    let program = Program::compile("1, 2").expect("compiles");
    assert_eq!(
        program.run_all(json!(null), 2).expect("runs"),
        vec![json!(1), json!(2)]
    );
    assert_eq!(
        program.run_all(json!(null), 1),
        Err(RunError::TooManyOutputs(1))
    );
    assert_eq!(
        RunError::TooManyOutputs(1).to_string(),
        "jq program yielded more than 1 outputs"
    );
    let program = Program::compile("empty").expect("compiles");
    assert_eq!(
        program.run_all(json!(null), 0).expect("runs"),
        Vec::<Value>::new()
    );
}

#[test]
fn compile_errors_are_described() {
    let message = compile_err("map(");
    assert!(
        message.starts_with("jq program does not compile: "),
        "{message}"
    );
    assert_eq!(
        message,
        "jq program does not compile: unexpected end of program at offset 4, \
         expected closing parenthesis"
    );

    let message = compile_err("undefined_fn");
    assert_eq!(
        message,
        "jq program does not compile: undefined function `undefined_fn/0` at offset 0"
    );

    let message = compile_err(".a | foo(1) | bar");
    assert_eq!(
        message,
        "jq program does not compile: undefined function `foo/1` at offset 5; \
         undefined function `bar/0` at offset 14"
    );

    let message = compile_err(". | )");
    assert!(
        message.starts_with("jq program does not compile: "),
        "{message}"
    );
    assert!(message.contains("at offset"), "{message}");

    for code in [
        "$x",
        "env",
        "$ENV",
        "input",
        "inputs",
        "import \"m\" as m; .",
    ] {
        let message = compile_err(code);
        assert!(
            message.starts_with("jq program does not compile: "),
            "{code}: {message}"
        );
    }
    assert_eq!(
        compile_err(""),
        "jq program does not compile: unexpected end of program at offset 0, expected term"
    );
}

#[test]
fn program_is_shareable() {
    let program = Program::compile("map(. + 1)").expect("compiles");
    assert_eq!(program.source(), "map(. + 1)");
    let copy = program.clone();
    let handle = std::thread::spawn(move || copy.run(json!([1, 2])).expect("runs"));
    assert_eq!(handle.join().expect("thread finishes"), json!([2, 3]));
    assert_eq!(program.run(json!([0])).expect("runs"), json!([1]));
    assert!(format!("{program:?}").contains("map(. + 1)"));
}

const TOO_DEEP_PROGRAM: &str = "jq program is nested deeper than 128 levels";

/// Returns `inner` wrapped in `levels` copies of `open` and `close`.
fn nest(levels: usize, open: &str, inner: &str, close: &str) -> String {
    format!("{}{inner}{}", open.repeat(levels), close.repeat(levels))
}

/// Returns a program whose output is `0` inside `levels` arrays.
fn deep_array(levels: usize) -> String {
    format!("reduce range({levels}) as $i (0; [.])")
}

#[test]
fn programs_nested_up_to_the_limit_compile() {
    let limit = MAX_PROGRAM_NESTING;
    for (open, close) in [("(", ")"), ("[", "]"), ("{a: ", "}"), ("\"\\(", ")\"")] {
        let program = nest(limit, open, "1", close);
        assert!(Program::compile(&program).is_ok(), "{program}");
    }
    check(&nest(limit, "(", ".", ")"), json!(1), json!(1));
    check(&nest(limit, "\"\\(", "1", ")\""), json!(null), json!("1"));
}

#[test]
fn programs_nested_deeper_are_refused_before_parsing() {
    let limit = MAX_PROGRAM_NESTING;
    for program in [
        nest(limit + 1, "(", ".", ")"),
        nest(limit + 1, "[", ".", "]"),
        nest(limit + 1, "{a: ", ".", "}"),
        nest(limit + 1, "\"\\(", "1", ")\""),
        nest(limit / 2 + 1, "[(", ".", ")]"),
        nest(limit / 2 + 1, "\"\\((", "1", "))\""),
        nest(2_000, "(", ".", ")"),
        "(".repeat(4_000),
        format!(". | {}", "[".repeat(4_000)),
        format!("# \"\n{}", nest(limit + 1, "(", ".", ")")),
    ] {
        assert_eq!(compile_err(&program), TOO_DEEP_PROGRAM, "{program}");
    }
}

#[test]
fn programs_longer_than_the_limit_are_refused() {
    let long = vec!["1"; MAX_PROGRAM_LEN / 2 + 1].join("+");
    assert!(
        compile_err(&long).contains("bytes long"),
        "{}",
        compile_err(&long)
    );
    // The longest program compiles and runs on a thread with the stack the scheduler and
    // the worker give their runtime threads.
    let fits = vec!["1"; MAX_PROGRAM_LEN / 2].join("+");
    let output = std::thread::Builder::new()
        .stack_size(32 * 1024 * 1024)
        .spawn(move || Program::compile(&fits).map(|program| program.run(json!(null))))
        .expect("thread starts")
        .join()
        .expect("thread finishes");
    assert_eq!(output, Ok(Ok(json!(MAX_PROGRAM_LEN / 2))));
}

#[test]
fn brackets_in_strings_and_comments_do_not_count() {
    let deep = "(".repeat(1000);
    check(&format!("\"{deep}\""), json!(null), json!(deep));
    check(
        &format!("\"\\\"{deep}\""),
        json!(null),
        json!(format!("\"{deep}")),
    );
    check(&format!("\"\\\\\" | \"{deep}\""), json!(null), json!(deep));
    check(
        &format!("\"\\(1){deep}\""),
        json!(null),
        json!(format!("1{deep}")),
    );
    check(&format!(". # {deep}\n"), json!(1), json!(1));
    check(&format!(". # {deep}"), json!(1), json!(1));
    check(
        &format!(". # a comment \\\n {deep}\n| . + 1"),
        json!(1),
        json!(2),
    );
    check(
        &format!("\"#\" + \"{deep}\""),
        json!(null),
        json!(format!("#{deep}")),
    );
}

#[test]
fn outputs_nested_deeper_than_max_depth_are_refused() {
    let nested = (0..MAX_DEPTH).fold(json!(0), |value, _| json!([value]));
    check(&deep_array(MAX_DEPTH), json!(null), nested);
    let too_deep = RunError::NotJson("value is nested deeper than 64 levels".to_owned());
    assert_eq!(run_err(&deep_array(MAX_DEPTH + 1), json!(null)), too_deep);
    assert_eq!(run_err(&deep_array(100_000), json!(null)), too_deep);
    assert_eq!(
        run_err("reduce range(100000) as $i (0; {a: .})", json!(null)),
        too_deep
    );
    let deep_key = format!("{{({}): 1}}", deep_array(MAX_DEPTH));
    assert_eq!(run_err(&deep_key, json!(null)), too_deep);
    let after_others = format!("1, [2], {}", deep_array(100_000));
    assert_eq!(run_err(&after_others, json!(null)), too_deep);
    assert_eq!(
        too_deep.to_string(),
        "jq output is not JSON: value is nested deeper than 64 levels"
    );
}

#[test]
fn errors_holding_values_nested_too_deep_are_not_shown() {
    let not_shown = RunError::Failed(
        "jq program raised an error whose value is nested deeper than 64 levels".to_owned(),
    );
    for program in [
        format!("error({})", deep_array(MAX_DEPTH + 1)),
        format!("error({})", deep_array(100_000)),
        format!("{} | .a", deep_array(100_000)),
        format!("error({{a: {}}})", deep_array(100_000)),
    ] {
        assert_eq!(run_err(&program, json!(null)), not_shown, "{program}");
    }
    let shown = format!("{}0{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
    assert_eq!(
        run_err(&format!("error({})", deep_array(MAX_DEPTH)), json!(null)),
        RunError::Failed(shown)
    );
    assert_eq!(
        run_err(&format!("error(\"{}\")", "[".repeat(1000)), json!(null)),
        RunError::Failed("[".repeat(1000))
    );
    assert_eq!(
        run_err(
            &format!("error({{a: \"{}\"}})", "[".repeat(1000)),
            json!(null)
        ),
        RunError::Failed(format!("{{\"a\":\"{}\"}}", "[".repeat(1000)))
    );
}

#[test]
fn the_cache_tells_which_programs_it_holds() {
    let cache = ProgramCache::default();
    assert!(!cache.contains(".a"));
    cache.get(".a").expect("compiles");
    assert!(cache.contains(".a"));
    assert!(cache.get("(").is_err());
    assert!(
        !cache.contains("("),
        "a program that does not compile is not kept"
    );
}

#[test]
fn programs_that_read_their_input_once_are_quick() {
    for program in [
        ".",
        ".a",
        ".a.b[0]?",
        ".[1:3]",
        ".[.key]",
        "{id: .id, name: (.first + \" \" + .last), tags}",
        "[.a, .b, 1, \"x\", null]",
        ".a, .b",
        "\"\\(.name) is \\(.age | tostring)\"",
        "if .n > 3 then \"big\" elif .n < 0 then \"neg\" else .n end",
        ".a // \"default\"",
        ".total as $t | {t: $t, half: ($t / 2)}",
        ".user | {name, id}",
        ".a.b as $x | $x.c | length",
        ".csv / \",\"",
        "try .a.b catch \"none\"",
        "(.items | length) == 0 and (.name | not)",
        "{(.key): .value}",
        ".n | floor",
        "-.n + 1",
    ] {
        let compiled = Program::compile(program).expect("program compiles");
        assert!(compiled.is_quick(), "{program:?} is quick");
    }
}

#[test]
fn programs_that_iterate_recurse_or_call_with_arguments_are_not_quick() {
    let long = format!("[{}]", vec![".a"; MAX_QUICK_LEN / 3 + 1].join(","));
    for program in [
        ".[]",
        "..",
        "[.[] | .a]",
        "map(.a)",
        "select(.a)",
        "[range(10)]",
        "reduce .[] as $x (0; . + $x)",
        "foreach .[] as $x (0; . + $x)",
        "def f: .; f",
        "repeat(.)",
        "recurse",
        "add",
        "(.a, .b) + (.c, .d)",
        ".s * 1000",
        ".a - .b",
        ". + . | . + . | . + .",
        "(. + .) as $x | $x + $x",
        "{a: .} | .a",
        "-.n | floor",
        "{a: (1, 2)}",
        ".a |= 1",
        ".a = 1",
        ".[] as [$x] | $x",
        "label $out | 1",
        "@base64",
        "limit(3; .[])",
        long.as_str(),
    ] {
        let compiled = Program::compile(program).expect("program compiles");
        assert!(!compiled.is_quick(), "{program:?} is not quick");
    }
}
