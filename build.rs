//! Stops a plain `cargo build` from compiling a patched russh that no longer matches
//! `patches/russh/`: after a pull that changes a patch, `scripts/patch-russh.sh` must run again.
//! (The scripts under `scripts/` run it themselves; when it never ran, cargo cannot even find the
//! crate, and the directory's name in its error says what to run.)

use std::path::Path;

const PREPARED: &str = "build/russh-from-scripts-patch-russh.sh/.bpg-tunnel-patches";

fn main() {
    println!("cargo:rerun-if-changed=patches/russh");
    println!("cargo:rerun-if-changed={PREPARED}");
    let mut patches: Vec<_> = std::fs::read_dir("patches/russh")
        .expect("patches/russh")
        .map(|entry| entry.expect("patches/russh").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "patch"))
        .collect();
    // The order the script's glob applies them in.
    patches.sort();
    let mut current = Vec::new();
    for patch in &patches {
        current.extend(std::fs::read(patch).expect("read a patch"));
    }
    let prepared = std::fs::read(Path::new(PREPARED)).unwrap_or_default();
    if prepared != current {
        panic!(
            "the patched russh in build/ does not match patches/russh/: run scripts/patch-russh.sh"
        );
    }
}
