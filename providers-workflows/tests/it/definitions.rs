use providers_workflows::definition::StepKind;
use providers_workflows::{DefinitionError, parse};

const SEED: &str = include_str!("../../../host/src/config/workflows/purchase_requisition.toml");

/// `(line, column)` of each error, 1-based, and its message.
fn placed(text: &str, errors: &[DefinitionError]) -> Vec<(usize, usize, String)> {
    errors
        .iter()
        .map(|e| {
            let before = &text[..e.span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            (line, column, e.message.clone())
        })
        .collect()
}

#[test]
fn the_seed_requisition_parses_with_its_schedule() {
    let d = parse(SEED).expect("the seed parses");
    assert_eq!(
        (d.name.as_str(), d.version, d.steps.len()),
        ("purchase_requisition", 1, 3)
    );
    match &d.steps[0].kind {
        StepKind::Approval {
            role,
            sla_ms,
            escalate_to,
            escalate_after_ms,
            actions,
            ..
        } => {
            assert_eq!(role, "DEPT_HEAD");
            assert_eq!(*sla_ms, Some(24 * 3_600_000));
            assert_eq!(escalate_to.as_deref(), Some("PLANT_MANAGER"));
            assert_eq!(*escalate_after_ms, Some(72 * 3_600_000));
            assert_eq!(actions, &["approve", "reject", "send_back"]);
        }
        other => panic!("not an approval: {other:?}"),
    }
    assert_eq!(d.steps[1].when.as_deref(), Some("input.amount > 50000"));
    // The digest names the content: the same text gives the same digest, a change another.
    assert_eq!(d.digest(), parse(SEED).expect("parses").digest());
    let changed = SEED.replace("sla = \"48h\"", "sla = \"36h\"");
    assert_ne!(d.digest(), parse(&changed).expect("parses").digest());
}

#[test]
fn every_mistake_is_reported_at_its_line_and_column() {
    let text = r#"name = "bad_flow"
version = 1

[[steps]]
id = "ask"
type = "approval"
role = "BOSS"
sla = "soon"
escalate_to = "CEO"

[[steps]]
id = "ask"
type = "call"
service = "kv"
action = "set"
when = "input.amount >"
payload = { key = "${steps.later.output.id}" }
retry = { attempts = 0, on = ["NOPE"] }

[[steps]]
id = "later"
type = "teleport"
"#;
    let errors = parse(text).expect_err("refused");
    let found = placed(text, &errors);
    let expect: &[(usize, usize, &str)] = &[
        (8, 7, "sla 'soon' is not a duration"),
        (9, 15, "step 'ask': escalate_to needs escalate_after"),
        (12, 6, "a second step has the id 'ask'"),
        (16, 8, "step 'ask' when, 1:"),
        (
            17,
            11,
            "step 'ask' payload.key: ${steps.later.output.id}: no step 'later' runs before this one",
        ),
        (18, 22, "retry.attempts must be from 1 to 100"),
        (18, 30, "retry.on: unknown error code 'NOPE'"),
        (22, 8, "step 'later': unknown type 'teleport'"),
    ];
    assert_eq!(found.len(), expect.len(), "{found:#?}");
    for ((line, column, message), (l, c, m)) in found.iter().zip(expect) {
        assert_eq!((*line, *column), (*l, *c), "{message}");
        assert!(message.starts_with(m), "{message} does not start with {m}");
    }
}

#[test]
fn toml_syntax_errors_and_unknown_fields_are_placed_too() {
    let errors = parse(
        "name = \"x\"\nversion = 1\n[[steps]]\nid = \"a\"\ntype = \"timer\"\nduraton = \"1h\"\n",
    )
    .expect_err("refused");
    let text =
        "name = \"x\"\nversion = 1\n[[steps]]\nid = \"a\"\ntype = \"timer\"\nduraton = \"1h\"\n";
    let found = placed(text, &errors);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!((found[0].0, found[0].1), (6, 1));
    assert!(
        found[0].2.contains("unknown field `duraton`"),
        "{}",
        found[0].2
    );
    let errors = parse("name = \"x\"\nversion = \n").expect_err("refused");
    assert_eq!(placed("name = \"x\"\nversion = \n", &errors)[0].0, 2);
}

#[test]
fn fields_of_another_step_type_are_refused() {
    let text = "name = \"x\"\nversion = 1\n[[steps]]\nid = \"wait\"\ntype = \"timer\"\nduration = \"1h\"\nrole = \"BOSS\"\n";
    let errors = parse(text).expect_err("refused");
    let found = placed(text, &errors);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!((found[0].0, found[0].1), (7, 8));
    assert_eq!(
        found[0].2,
        "`role` applies to approval steps, not to a timer step"
    );
}
