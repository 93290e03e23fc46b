//! The code map holds: every file under `src/` has its row in docs/architecture.md, and no two
//! modules depend on each other, directly or round about, so each can be read (and changed)
//! knowing only what it depends on.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path, into: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, into);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            into.push(path);
        }
    }
}

/// Every `.rs` file under `src/`, relative to the crate's root (`src/config/mod.rs`).
fn sources() -> Vec<String> {
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    let mut names: Vec<String> = files
        .iter()
        .map(|file| {
            let relative = file.strip_prefix(root()).unwrap();
            relative.to_string_lossy().into_owned()
        })
        .collect();
    names.sort();
    names
}

#[test]
fn every_source_file_is_in_the_module_map() {
    let map = std::fs::read_to_string(root().join("docs/architecture.md")).unwrap();
    let missing: Vec<_> = sources()
        .into_iter()
        .filter(|file| !map.contains(&format!("`{file}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/architecture.md has no row for {missing:?}: add one saying what each owns"
    );
}

/// The top-level module a file belongs to: `src/config/parser.rs` is in `config`.
fn module_of(file: &str) -> String {
    let inside = file.strip_prefix("src/").unwrap();
    let first = inside.split('/').next().unwrap();
    first.trim_end_matches(".rs").to_owned()
}

/// The code of a file without comments and without its unit tests, whose helpers may reach
/// further than the module does.
fn code_of(text: &str) -> String {
    let mut code = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        if trimmed == "#[cfg(test)]"
            && lines
                .peek()
                .is_some_and(|next| next.trim() == "mod tests {")
        {
            break;
        }
        if trimmed.starts_with("//") {
            continue;
        }
        code.push_str(line);
        code.push('\n');
    }
    code
}

/// The top-level names `code` reaches through `crate::`, including inside (nested) groups:
/// `use crate::{a::{b, c}, d}` names `a` and `d`.
fn uses(code: &str) -> BTreeSet<String> {
    let ident = |text: &str| -> String {
        text.trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut found = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        let Some(group) = rest.strip_prefix('{') else {
            found.insert(ident(rest));
            continue;
        };
        // The items of the group at its own depth: each one's first name.
        let mut depth = 0;
        let mut item_start = true;
        for (i, c) in group.char_indices() {
            if item_start && depth == 0 {
                found.insert(ident(&group[i..]));
                item_start = false;
            }
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => break,
                '}' => depth -= 1,
                ',' if depth == 0 => item_start = true,
                _ => {}
            }
        }
    }
    found.retain(|name| !name.is_empty());
    found
}

/// What `lib.rs` re-exports at the crate's root, by name, with the module it comes from:
/// `pub use engine::runtime;` maps `runtime` to `engine`.
fn re_exports() -> BTreeMap<String, String> {
    let lib = std::fs::read_to_string(root().join("src/lib.rs")).unwrap();
    let mut names = BTreeMap::new();
    for statement in code_of(&lib).split(';') {
        let Some(at) = statement.find("pub use ") else {
            continue;
        };
        let path: String = statement[at + "pub use ".len()..]
            .split_whitespace()
            .collect();
        let module = path.split("::").next().unwrap().to_owned();
        let items = match path.find('{') {
            Some(open) => path[open + 1..].trim_end_matches('}').to_owned(),
            None => path.rsplit("::").next().unwrap().to_owned(),
        };
        for item in items.split(',') {
            names.insert(item.trim().to_owned(), module.clone());
        }
    }
    names
}

/// Which top-level module depends on which, from every file under `src/` but `lib.rs` and
/// `main.rs` (which only declare and hand off). A name under `crate::` that is neither a module
/// nor one of `lib.rs`'s re-exports fails the test: an edge this cannot see must not pass
/// silently.
fn dependencies() -> BTreeMap<String, BTreeSet<String>> {
    let files: Vec<String> = sources()
        .into_iter()
        .filter(|file| file != "src/lib.rs" && file != "src/main.rs")
        .filter(|file| !file.ends_with("/tests.rs"))
        .collect();
    let modules: BTreeSet<String> = files.iter().map(|file| module_of(file)).collect();
    let re_exported = re_exports();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let module = module_of(&file);
        let mut text = std::fs::read_to_string(root().join(&file)).unwrap();
        // In `src/a/b.rs`, `super::super::` is the crate's root.
        if file.matches('/').count() == 2 && !file.ends_with("/mod.rs") {
            text = text.replace("super::super::", "crate::");
        }
        let edges = graph.entry(module.clone()).or_default();
        for name in uses(&code_of(&text)) {
            let used = match re_exported.get(&name) {
                Some(from) => from.clone(),
                None if modules.contains(&name) => name,
                None => panic!("{file} reaches crate::{name}, which is no module of src/"),
            };
            if used != module {
                edges.insert(used);
            }
        }
    }
    graph
}

/// A cycle through `graph`, as the modules along it, if there is one.
fn a_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|on| on == node) {
            let mut cycle = path[start..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

#[test]
fn no_module_depends_on_itself_round_about() {
    let graph = dependencies();
    // The check itself must see dependencies: a few that the code map describes.
    assert!(graph["engine"].contains("supervisor"), "{graph:?}");
    assert!(graph["forwarder"].contains("ssh"), "{graph:?}");
    if let Some(cycle) = a_cycle(&graph) {
        panic!(
            "an import cycle: {}; move what both need into a module of its own",
            cycle.join(" → ")
        );
    }
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let graph = |edges: &[(&str, &str)]| {
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (from, to) in edges {
            graph
                .entry((*from).into())
                .or_default()
                .insert((*to).into());
        }
        graph
    };
    assert_eq!(a_cycle(&graph(&[("a", "b"), ("b", "c"), ("a", "c")])), None);
    let cycle = a_cycle(&graph(&[("a", "b"), ("b", "c"), ("c", "a")])).unwrap();
    assert_eq!(cycle, ["a", "b", "c", "a"]);
    let code = "use crate::{a, b::c};\nfn f() { crate::d::e(); }\n// crate::f\n";
    assert_eq!(
        uses(&code_of(code)),
        ["a", "b", "d"].map(String::from).into()
    );
    let nested = "use crate::{\n    a::{b, c::{d, e}},\n    f,\n};";
    assert_eq!(uses(nested), ["a", "f"].map(String::from).into());
}
