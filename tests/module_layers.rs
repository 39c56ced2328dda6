//! The layering the code relies on, checked on the sources: `observe` and `act` know
//! nothing of the reconciler, the API's status types or each other's upper layers, and
//! the act drivers import none of each other (what they share is in `act::common`).

use std::path::Path;

/// Every `crate::...` path a source file names.
fn crate_paths(file: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(file).unwrap();
    text.match_indices("crate::")
        .map(|(at, _)| {
            text[at..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect()
        })
        .collect()
}

fn assert_never_names(file: &str, forbidden: &[&str]) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
    for named in crate_paths(&path) {
        for module in forbidden {
            assert!(
                !named.starts_with(module),
                "{file} names {named}: it must not depend on {module}"
            );
        }
    }
}

#[test]
fn observe_and_act_sit_below_the_reconciler_and_the_api() {
    let above = [
        "crate::reconcile",
        "crate::status",
        "crate::transition",
        "crate::lease",
        "crate::api",
        "crate::daemon",
    ];
    let dirs = ["src/observe", "src/act"];
    for dir in dirs {
        for entry in std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(dir)).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            let file = format!("{dir}/{name}");
            assert_never_names(&file, &above);
            if dir == "src/observe" {
                assert_never_names(&file, &["crate::act"]);
            }
        }
    }
    assert_never_names("src/process_exit.rs", &["crate::act", "crate::observe"]);
}

#[test]
fn act_drivers_import_none_of_each_other() {
    assert_never_names(
        "src/act/container.rs",
        &[
            "crate::act::docker",
            "crate::act::instance",
            "crate::act::native",
        ],
    );
    assert_never_names(
        "src/act/docker.rs",
        &["crate::act::instance", "crate::act::native"],
    );
    assert_never_names(
        "src/act/native.rs",
        &[
            "crate::act::docker",
            "crate::act::container",
            "crate::act::instance",
        ],
    );
    assert_never_names(
        "src/act/common.rs",
        &[
            "crate::act::docker",
            "crate::act::container",
            "crate::act::instance",
            "crate::act::native",
        ],
    );
}
