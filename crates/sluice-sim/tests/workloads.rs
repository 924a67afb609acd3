//! Every workload shipped in `workloads/` parses and validates.

use sluice_sim::workload::Workload;

#[test]
fn shipped_workloads_are_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../workloads");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path).unwrap();
            let w = Workload::from_yaml(&text, &path.display().to_string()).unwrap();
            assert!(w.total_duration_s() > 0.0);
            n += 1;
        }
    }
    assert!(
        n >= 5,
        "expected the shipped workloads in {}",
        dir.display()
    );
}
