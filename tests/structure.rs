//! The house without a circle: the modules of src/ import each other in
//! one direction only. Each file is read for the `crate::…` paths it
//! names (its `use` lines and paths written inline, not comments nor its
//! tests), a file counting for the top-level module it belongs to
//! (`master/fork.rs` is `master`); a cycle between two or more modules
//! fails the test, naming each import that closes it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`.
fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The module a file of src/ belongs to; `None` for the crate root, the
/// binary and unit-test files.
fn module_of(rel: &Path) -> Option<String> {
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    let leaf = rel.file_stem()?.to_str()?;
    if matches!(name, "lib" | "main") || leaf == "tests" {
        return None;
    }
    Some(name.to_string())
}

/// The modules `text` names after `crate::`, each with the line that
/// does, leaving out comments and an inline `mod tests`.
fn imports(text: &str) -> Vec<(String, String)> {
    let text = text
        .split("#[cfg(test)]\nmod tests {")
        .next()
        .unwrap_or(text);
    let mut out = Vec::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.push((name, line.trim().to_string()));
            }
        }
    }
    out
}

/// The strongly connected components of more than one module (Tarjan).
fn cycles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct T<'a> {
        edges: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        found: Vec<Vec<String>>,
    }
    impl<'a> T<'a> {
        fn visit(&mut self, v: &'a str) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            self.on.insert(v);
            for w in self.edges.get(v).into_iter().flatten() {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let lw = self.low[w];
                    let lv = self.low.get_mut(v).unwrap();
                    *lv = (*lv).min(lw);
                } else if self.on.contains(w) {
                    let iw = self.index[w];
                    let lv = self.low.get_mut(v).unwrap();
                    *lv = (*lv).min(iw);
                }
            }
            if self.low[v] == self.index[v] {
                let mut scc = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on.remove(w);
                    scc.push(w.to_string());
                    if w == v {
                        break;
                    }
                }
                if scc.len() > 1 {
                    scc.sort();
                    self.found.push(scc);
                }
            }
        }
    }
    let mut t = T {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in edges.keys() {
        if !t.index.contains_key(v.as_str()) {
            t.visit(v);
        }
    }
    t.found
}

/// The floors of the house, lowest first: a module imports from its own
/// floor and those below. (The crate root and the binary stand on top.)
const FLOORS: &[(&str, &[&str])] = &[
    (
        "ground: system calls, time, the log",
        &["sys", "time", "logging", "signals"],
    ),
    (
        "parts: addresses, sockets, the wire formats, shared memory, the tables",
        &[
            "access",
            "echo",
            "proxy",
            "listen",
            "scoreboard",
            "turns",
            "kind",
            "pool",
            "backoff",
            "children",
            "upgrade",
            "reload",
            "engine",
            "config",
            "daemon",
            "systemd",
            "activation",
        ],
    ),
    (
        "what a connection passes: the gate, the relay, the vault, accepting",
        &["admission", "relay", "vault", "accept"],
    ),
    ("the children", &["worker", "event", "udp", "metrics"]),
    ("the master", &["master"]),
];

/// Imports from a lower floor to a higher one the house allows (each a
/// type a lower part names in its own signature: config's `Policy`, the
/// fd store's vault).
const UPWARD_AT_MOST: usize = 2;

/// Which modules each module imports.
type Edges = BTreeMap<String, BTreeSet<String>>;
/// The line that makes each import (`from`, `to`).
type Said = BTreeMap<(String, String), String>;

/// Every module's imports, the line that makes each, and the modules.
fn graph() -> (Edges, Said, BTreeSet<String>) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut all = Vec::new();
    files(&src, &mut all);
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut said: BTreeMap<(String, String), String> = BTreeMap::new();
    let mut known = BTreeSet::new();
    let mut read = Vec::new();
    for path in &all {
        let rel = path.strip_prefix(&src).unwrap();
        if let Some(m) = module_of(rel) {
            known.insert(m.clone());
            read.push((
                m,
                rel.display().to_string(),
                std::fs::read_to_string(path).unwrap(),
            ));
        }
    }
    for (m, file, text) in &read {
        edges.entry(m.clone()).or_default();
        for (to, line) in imports(text) {
            if &to != m && known.contains(&to) {
                edges.get_mut(m).unwrap().insert(to.clone());
                said.entry((m.clone(), to))
                    .or_insert(format!("{file}: {line}"));
            }
        }
    }
    (edges, said, known)
}

#[test]
fn every_module_stands_on_a_floor_and_few_imports_go_up() {
    let (edges, said, known) = graph();
    let floor = |m: &str| FLOORS.iter().position(|(_, ms)| ms.contains(&m));
    let homeless: Vec<&String> = known.iter().filter(|m| floor(m).is_none()).collect();
    assert!(
        homeless.is_empty(),
        "modules on no floor (add each to FLOORS in tests/structure.rs): {homeless:?}"
    );
    let up: Vec<&String> = edges
        .iter()
        .flat_map(|(a, bs)| bs.iter().map(move |b| (a, b)))
        .filter(|(a, b)| floor(b) > floor(a))
        .filter_map(|(a, b)| said.get(&(a.clone(), b.clone())))
        .collect();
    assert!(
        up.len() <= UPWARD_AT_MOST,
        "{} imports go up a floor (at most {UPWARD_AT_MOST}):\n  {}",
        up.len(),
        up.iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n  ")
    );
}

#[test]
fn no_module_imports_its_way_back_to_itself() {
    let (edges, said, known) = graph();
    assert!(
        known.len() >= 20,
        "only {} modules found in src/",
        known.len()
    );
    let found = cycles(&edges);
    let named: Vec<String> = found
        .iter()
        .map(|c| {
            let lines: Vec<&str> = c
                .iter()
                .flat_map(|a| c.iter().map(move |b| (a, b)))
                .filter_map(|(a, b)| said.get(&(a.clone(), b.clone())).map(String::as_str))
                .collect();
            format!("{}:\n  {}", c.join(" <-> "), lines.join("\n  "))
        })
        .collect();
    assert!(
        named.is_empty(),
        "import cycles between modules:\n{}",
        named.join("\n")
    );
}

/// The check itself finds a cycle where there is one.
#[test]
fn a_cycle_is_found_and_named() {
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let e = |a: &str, b: &str, m: &mut BTreeMap<String, BTreeSet<String>>| {
        m.entry(a.into()).or_default().insert(b.into());
    };
    e("sys", "children", &mut edges);
    e("children", "scoreboard", &mut edges);
    e("scoreboard", "sys", &mut edges);
    e("master", "sys", &mut edges);
    assert_eq!(cycles(&edges), vec![vec!["children", "scoreboard", "sys"]]);
    assert_eq!(
        imports("use crate::sys::close_range; // crate::master\nlet x = crate::vault::NAME;"),
        vec![
            (
                "sys".to_string(),
                "use crate::sys::close_range; // crate::master".to_string()
            ),
            (
                "vault".to_string(),
                "let x = crate::vault::NAME;".to_string()
            )
        ]
    );
}
