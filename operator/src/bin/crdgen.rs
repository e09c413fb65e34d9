//! `crdgen [DIR...]`: writes the custom resource definitions, one YAML file per kind,
//! into each DIR (by default the repository's `crds/` and the chart's `crds/`, which
//! Helm installs). A test fails while either differs from what this writes.

use std::path::PathBuf;

use anyhow::Context;
use petrel_operator::crd;

fn main() -> anyhow::Result<()> {
    let mut dirs: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    if dirs.is_empty() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        dirs = vec![root.join("crds"), root.join("charts/petrel/crds")];
    }
    for dir in dirs {
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        for definition in crd::all() {
            let path = dir.join(crd::file_name(&definition));
            let yaml = crd::to_yaml(&definition)?;
            std::fs::write(&path, yaml)
                .with_context(|| format!("cannot write {}", path.display()))?;
            println!("{}", path.display());
        }
    }
    Ok(())
}
