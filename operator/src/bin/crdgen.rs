//! `crdgen [DIR]`: writes the custom resource definitions, one YAML file per kind, into
//! DIR (`crds/` of the repository by default). A test fails while `crds/` differs from
//! what this writes.

use std::path::PathBuf;

use anyhow::Context;
use petrel_operator::crd;

fn main() -> anyhow::Result<()> {
    let dir = std::env::args_os().nth(1).map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../crds"),
        PathBuf::from,
    );
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for definition in crd::all() {
        let path = dir.join(crd::file_name(&definition));
        let yaml = crd::to_yaml(&definition)?;
        std::fs::write(&path, yaml).with_context(|| format!("cannot write {}", path.display()))?;
        println!("{}", path.display());
    }
    Ok(())
}
