//! The checks of workflow definitions, case by case.

use super::*;
use serde_json::json;

fn parse(value: serde_json::Value) -> WorkflowDefinition {
    serde_json::from_value(value).expect("definition parses")
}

fn check(value: serde_json::Value, expected: &[&str]) {
    let definition = parse(value);
    let problems: Vec<String> = match definition.validate(&jq::ProgramCache::default()) {
        Ok(()) => Vec::new(),
        Err(error) => error.problems.iter().map(ToString::to_string).collect(),
    };
    assert_eq!(problems.len(), expected.len(), "{problems:?}");
    for (problem, want) in problems.iter().zip(expected) {
        assert!(
            problem.contains(want),
            "{problem:?} should contain {want:?}"
        );
    }
}

#[test]
fn planning_needs_programs_only_for_input_for_each_and_when() {
    let plain = parse(json!({"steps": [
        {"id": "a", "dataflow": ".x"},
        {"id": "b", "python": "m:f", "after": ["a"]}
    ]}));
    assert!(!plain.plans_with_programs());
    for field in ["input", "for_each", "when"] {
        let mut step = json!({"id": "b", "python": "m:f", "after": ["a"]});
        step[field] = json!(".");
        let definition = parse(json!({"steps": [{"id": "a", "dataflow": "."}, step]}));
        assert!(definition.plans_with_programs(), "{field}");
    }
    for limit in [
        json!({"rate_limit": {"per_second": 1, "key": ".k"}}),
        json!({"concurrency": {"limit": 1, "key": ".k"}}),
    ] {
        let mut step = json!({"id": "b", "python": "m:f"});
        for (field, value) in limit.as_object().expect("an object") {
            step[field] = value.clone();
        }
        let definition = parse(json!({"steps": [step]}));
        assert!(definition.plans_with_programs(), "{limit}");
        let programs = jq::ProgramCache::default();
        assert!(
            !definition.plans_with_quick_programs(&programs),
            "not compiled"
        );
        programs.get(".k").expect("compiles");
        assert!(definition.plans_with_quick_programs(&programs), "{limit}");
        let slow = json!({"steps": [{"id": "b", "python": "m:f",
            "concurrency": {"limit": 1, "key": "[.[] | .k] | length"}}]});
        programs.get("[.[] | .k] | length").expect("compiles");
        assert!(!parse(slow).plans_with_quick_programs(&programs), "{limit}");
    }
    let unkeyed = parse(json!({"steps": [{"id": "b", "python": "m:f",
        "rate_limit": {"per_second": 1}, "concurrency": {"limit": 1}}]}));
    assert!(!unkeyed.plans_with_programs());
}

#[test]
fn valid_definitions_pass() {
    check(
        json!({"name": "orders", "steps": [
            {"id": "load", "python": "etl.orders:load"},
            {"id": "clean", "dataflow": "map(select(.qty > 0))", "after": ["load"]},
            {"id": "total", "dataflow": "map(.price) | add", "after": ["clean"]}
        ]}),
        &[],
    );
    check(
        json!({"steps": [{"id": "a", "python_code": "def main(input):\n    return input"}]}),
        &[],
    );
}

#[test]
fn bad_steps_are_named() {
    check(json!({"steps": []}), &["at least one step"]);
    check(
        json!({"steps": [{"id": "a"}]}),
        &["step \"a\": needs one of"],
    );
    check(
        json!({"steps": [{"id": "a", "python": "m:f", "dataflow": "."}]}),
        &["more than one"],
    );
    check(
        json!({"steps": [{"id": "a", "python": "not a ref"}]}),
        &["step \"a\": `python` reference \"not a ref\""],
    );
    check(
        json!({"steps": [{"id": "a b", "dataflow": "."}]}),
        &["id must be"],
    );
    check(
        json!({"steps": [{"id": "a", "dataflow": "map("}]}),
        &["step \"a\": `dataflow`: jq program does not compile"],
    );
    check(
        json!({"steps": [{"id": "a", "dataflow": ".", "when": "nosuchfn"}]}),
        &["`when`: jq program does not compile"],
    );
    check(
        json!({"steps": [{"id": "a", "dataflow": "."}, {"id": "a", "dataflow": "."}]}),
        &["used by more than one step"],
    );
    check(
        json!({"steps": [{"id": "a", "dataflow": ".", "priority": 12, "queue": "x y"}]}),
        &["`queue`", "`priority`"],
    );
    check(
        json!({"steps": [{"id": "a", "dataflow": ".", "timeout_s": 0}]}),
        &["`timeout_s`"],
    );
    check(
        json!({"steps": [{"id": "a", "dataflow": "."}], "timeout_s": 0}),
        &["the workflow's `timeout_s` must be a positive number of seconds"],
    );
    check(
        json!({"steps": [{"id": "a", "dataflow": "."}], "timeout_s": 4e7}),
        &["the workflow's `timeout_s`"],
    );
    check(
        json!({"steps": [{"id": "a", "dataflow": ".", "timeout_s": 1e12}]}),
        &["`timeout_s` must be a positive number of seconds, at most 604800"],
    );
    check(
        json!({"steps": [{"id": "a", "dataflow": ".", "timeout_s": 604800}]}),
        &[],
    );
    check(
        json!({"steps": [{"id": "a", "dataflow": ".", "retry": {"max_attempts": 0}}]}),
        &["max_attempts"],
    );
    check(
        json!({"steps": [{"id": "a", "dataflow": ".",
            "retry": {"max_backoff_ms": 9_223_372_036_854_775_808_u64}}]}),
        &["`retry.initial_backoff_ms` and `retry.max_backoff_ms` must be at most"],
    );
}

#[test]
fn bad_references_are_named() {
    check(
        json!({"steps": [{"id": "a", "dataflow": ".", "after": ["ghost"]}]}),
        &["step \"a\": `after` names unknown step \"ghost\""],
    );
    check(
        json!({"steps": [{"id": "a", "dataflow": ".", "after": ["a"]}]}),
        &["names the step itself"],
    );
    check(
        json!({"steps": [{"id": "a", "dataflow": "."}], "output": "zz"}),
        &["`output` names unknown step \"zz\""],
    );
}

#[test]
fn cycles_are_found() {
    check(
        json!({"steps": [
            {"id": "a", "dataflow": ".", "after": ["c"]},
            {"id": "b", "dataflow": ".", "after": ["a"]},
            {"id": "c", "dataflow": ".", "after": ["b"]},
            {"id": "d", "dataflow": "."}
        ]}),
        &["cycle: a -> c -> b -> a"],
    );
}

#[test]
fn unknown_fields_are_refused() {
    let error = serde_json::from_value::<WorkflowDefinition>(
        json!({"steps": [{"id": "a", "dataflow": ".", "colour": 1}]}),
    )
    .expect_err("unknown field");
    assert!(error.to_string().contains("colour"), "{error}");
}

#[test]
fn retry_defaults_fill_missing_fields() {
    let step: StepDefinition =
        serde_json::from_value(json!({"id": "a", "dataflow": ".", "retry": {"max_attempts": 5}}))
            .expect("parses");
    let retry = step.retry.expect("retry present");
    assert_eq!(retry.max_attempts, 5);
    assert_eq!(retry.initial_backoff_ms, 200);
    assert_eq!(retry.max_backoff_ms, 30_000);
}

#[test]
fn run_output_follows_the_rules() {
    let outputs: BTreeMap<String, serde_json::Value> =
        [("a".to_owned(), json!(1)), ("b".to_owned(), json!(2))].into();
    let chain = parse(json!({"steps": [
        {"id": "a", "dataflow": "."}, {"id": "b", "dataflow": ".", "after": ["a"]}]}));
    assert_eq!(chain.run_output(&outputs), json!(2));
    let named = parse(json!({"output": "a", "steps": [
        {"id": "a", "dataflow": "."}, {"id": "b", "dataflow": ".", "after": ["a"]}]}));
    assert_eq!(named.run_output(&outputs), json!(1));
    let two_sinks =
        parse(json!({"steps": [{"id": "a", "dataflow": "."}, {"id": "b", "dataflow": "."}]}));
    assert_eq!(two_sinks.run_output(&outputs), json!({"a": 1, "b": 2}));
}

#[test]
fn a_definition_with_a_nul_character_is_refused() {
    check(
        json!({"steps": [{"id": "a", "python_code": "def main(x):\n    return '\u{0}'\n"}]}),
        &["the definition cannot be stored"],
    );
}

#[test]
fn limits_as_documented_are_valid_and_bad_ones_are_named() {
    let documented = json!({"steps": [
        {"id": "charge", "python": "billing:charge",
         "rate_limit": {"per_second": 10.0, "burst": 5, "key": ".customer_id"},
         "concurrency": {"limit": 2, "key": ".customer_id"}},
        {"id": "export", "python": "etl.orders:export", "concurrency": {"limit": 2, "key": ".tenant"}},
        {"id": "slow", "dataflow": ".", "rate_limit": {"per_second": 0.5}}
    ]});
    let definition = parse(documented.clone());
    definition
        .validate(&jq::ProgramCache::default())
        .expect("valid");
    assert_eq!(
        serde_json::to_value(&definition).expect("serializes"),
        documented
    );
    assert_eq!(
        definition.steps[2]
            .rate_limit
            .as_ref()
            .map(RateLimit::burst),
        Some(1)
    );
    check(
        json!({"steps": [{"id": "a", "dataflow": ".",
            "rate_limit": {"per_second": 0, "burst": 0, "key": "."},
            "concurrency": {"limit": 0, "key": "{"}}]}),
        &[
            "`rate_limit.per_second`",
            "`rate_limit.burst`",
            "`concurrency.limit`",
            "`concurrency.key`",
        ],
    );
}
