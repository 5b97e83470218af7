//! The providers compiled into this binary.

use provider_host::builtin_registry;

#[test]
fn exactly_the_expected_builtins_are_compiled_in() {
    // A builtin crate the linker dropped would vanish silently; this names the whole set.
    let registry = builtin_registry().unwrap();
    let found: Vec<String> = registry
        .factories()
        .map(|f| {
            format!(
                "{}@{} ({:?})",
                f.descriptor().service,
                f.descriptor().version,
                f.kind()
            )
        })
        .collect();
    assert_eq!(
        found,
        [
            "kv@1.0.0 (Builtin)",
            "purchase-orders@1.0.0 (Builtin)",
            "rules@1.0.0 (Builtin)",
            "uid@1.0.0 (Builtin)",
            "workflows@1.0.0 (Builtin)"
        ]
    );
}
