//! Tidy checks: the architecture rules of ARCHITECTURE.md ("Invariants checked by a test")
//! as a test that names the file and line that breaks one.
//!
//! Every `.rs` file under `src/`, `tests/` and `examples/` is read as text and lexed first,
//! so comments and string literals never count: "sled" in a doc comment, a sample inside a
//! string, or "monotonic" are not crate paths. `build.rs` is outside these directories and
//! exempt. Each rule is a function of (path relative to the crate root, text), so the
//! self-tests at the end can feed it samples.

use std::path::Path;

/// One broken rule: the line it is on and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Violation {
    line: usize,
    message: String,
}

/// A rule: (path relative to the crate root with `/` separators, file text) -> violations.
type Rule = fn(&str, &str) -> Vec<Violation>;

/// Every rule, by the name a failure report uses.
const RULES: &[(&str, Rule)] = &[
    ("doc line", doc_line),
    ("sled edge", sled_only_in_raft_store),
    ("wire edge", tonic_and_prost_only_in_rpc),
    ("stdout edge", stdout_only_in_cli),
    ("pure core", pure_cores_do_no_io),
    ("layering", modules_import_only_downwards),
];

/// The directories whose `.rs` files the rules read.
const CHECKED_DIRS: &[&str] = &["src", "tests", "examples"];

#[test]
fn the_source_tree_keeps_its_invariants() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in CHECKED_DIRS {
        for entry in walkdir::WalkDir::new(root.join(dir)) {
            let entry = entry.unwrap_or_else(|e| panic!("cannot list {dir}/: {e}"));
            if entry.file_type().is_file() && entry.path().extension() == Some("rs".as_ref()) {
                files.push(entry.into_path());
            }
        }
    }
    files.sort();
    assert!(
        files.iter().any(|f| f.ends_with("src/lib.rs")),
        "tidy found no src/lib.rs under {}: is CARGO_MANIFEST_DIR the crate root?",
        root.display()
    );
    let mut failures = Vec::new();
    for file in &files {
        let relative = file
            .strip_prefix(root)
            .expect("walked below the root")
            .to_string_lossy()
            .replace('\\', "/");
        let text =
            std::fs::read_to_string(file).unwrap_or_else(|e| panic!("cannot read {relative}: {e}"));
        for (name, rule) in RULES {
            for violation in rule(&relative, &text) {
                failures.push(format!(
                    "{relative}:{}: [{name}] {}",
                    violation.line, violation.message
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} tidy violation(s) (rules in ARCHITECTURE.md, \"Invariants checked by a test\"):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

// ---- rules ----------------------------------------------------------------------------

/// Every file starts with a `//!` line saying what it is for.
fn doc_line(_path: &str, text: &str) -> Vec<Violation> {
    if text.starts_with("//!") {
        return Vec::new();
    }
    vec![Violation {
        line: 1,
        message: "the file does not start with a `//!` line: add one saying what the file is for"
            .into(),
    }]
}

/// Only `src/raft_store/` sees sled.
fn sled_only_in_raft_store(path: &str, text: &str) -> Vec<Violation> {
    if path.starts_with("src/raft_store/") {
        return Vec::new();
    }
    crate_uses(text, |name| name == "sled")
        .map(|(line, name)| Violation {
            line,
            message: format!(
                "uses the `{name}` crate: only src/raft_store/ may see sled; \
                 go through raft_store's LogStore/StateMachineStore instead"
            ),
        })
        .collect()
}

/// Only `src/rpc/` sees tonic and prost (and their companion crates).
/// The attack suite is the exception: a hostile client must forge raw wire messages.
fn tonic_and_prost_only_in_rpc(path: &str, text: &str) -> Vec<Violation> {
    if path.starts_with("src/rpc/") || path == "tests/it/attacks.rs" {
        return Vec::new();
    }
    let wire_crate = |name: &str| {
        ["tonic", "prost"]
            .iter()
            .any(|base| name == *base || name.starts_with(&format!("{base}_")))
    };
    crate_uses(text, wire_crate)
        .map(|(line, name)| Violation {
            line,
            message: format!(
                "uses the `{name}` crate: only src/rpc/ may see tonic and prost; \
                 use the domain types of src/api.rs and the clients in src/rpc/"
            ),
        })
        .collect()
}

/// Only `src/cli/` prints to stdout. Tests and examples are not the product and may.
fn stdout_only_in_cli(path: &str, text: &str) -> Vec<Violation> {
    if !path.starts_with("src/") || path.starts_with("src/cli/") {
        return Vec::new();
    }
    let code = Code::lex(text);
    let fix = "only src/cli/ prints to stdout: return the value to the CLI, \
               or log it with tracing (eprintln! for stderr)";
    let mut found = Vec::new();
    for (at, token) in code.tokens.iter().enumerate() {
        if let Tok::Ident(name) = &token.tok {
            if (name == "print" || name == "println") && code.punct_at(at + 1, '!') {
                found.push(Violation {
                    line: token.line,
                    message: format!("`{name}!` writes to stdout: {fix}"),
                });
            }
        }
    }
    for path in code.paths() {
        let io_stdout = path
            .segments
            .ends_with(&["io".to_string(), "stdout".to_string()]);
        if io_stdout {
            found.push(Violation {
                line: path.line,
                message: format!("`{}` is stdout: {fix}", path.segments.join("::")),
            });
        }
    }
    found.sort_by_key(|v| v.line);
    found
}

/// Whether `path` is one of the pure cores: values in, values out, no I/O and no clock.
fn is_pure_core(path: &str) -> bool {
    path.starts_with("src/state/")
        || path.starts_with("src/rollout/engine/")
        || [
            "src/release/manifest.rs",
            "src/release/delta.rs",
            "src/release/signature.rs",
            "src/rollout/preflight.rs",
            "src/rollout/plan.rs",
            "src/rollout/engine.rs",
            "src/rollout/auto.rs",
            "src/node/quorum.rs",
        ]
        .contains(&path)
}

/// Pure cores import neither tokio, `std::fs` nor `std::net`, and read no clock.
fn pure_cores_do_no_io(path: &str, text: &str) -> Vec<Violation> {
    if !is_pure_core(path) {
        return Vec::new();
    }
    let code = Code::lex(text);
    let fix = "a pure core takes values and returns values; \
               let the caller do the I/O (or read the time) and pass the result in";
    let mut found = Vec::new();
    for path in code.paths() {
        let segments: Vec<&str> = path.segments.iter().map(String::as_str).collect();
        let what = match segments.as_slice() {
            ["tokio", ..] => "tokio",
            ["std", "fs", ..] => "std::fs",
            ["std", "net", ..] => "std::net",
            ["crate", "clock", ..] => "the clock (crate::clock)",
            _ => continue,
        };
        found.push(Violation {
            line: path.line,
            message: format!("uses {what} (`{}`): {fix}", segments.join("::")),
        });
    }
    for token in &code.tokens {
        if let Tok::Ident(name) = &token.tok {
            if ["Instant", "SystemTime", "UNIX_EPOCH"].contains(&name.as_str()) {
                found.push(Violation {
                    line: token.line,
                    message: format!("reads a clock (`{name}`): {fix}"),
                });
            }
        }
    }
    found.sort_by_key(|v| v.line);
    found.dedup();
    found
}

/// What each module may not import: dependencies point one way, node -> {rollout,
/// agent, raft} -> rpc -> {api, release, state}, so no import circle forms among rpc,
/// node, rollout and agent. A file's trailing `#[cfg(test)] mod tests` may reach further
/// (a test may build the real thing a module serves).
const LAYERS: &[(&str, &[&str])] = &[
    (
        "src/rpc/",
        &[
            "node",
            "rollout",
            "agent",
            "raft",
            "raft_store",
            "cli",
            "supervise",
        ],
    ),
    (
        "src/rollout/",
        &[
            "node",
            "rpc",
            "agent",
            "raft",
            "raft_store",
            "cli",
            "supervise",
        ],
    ),
    (
        "src/agent/",
        &["node", "rollout", "raft", "raft_store", "cli"],
    ),
    (
        "src/service/",
        &["node", "rollout", "agent", "raft", "raft_store", "cli"],
    ),
    ("src/raft/", &["node", "rollout", "agent", "cli"]),
    (
        "src/api",
        &[
            "node",
            "rollout",
            "rpc",
            "agent",
            "raft",
            "raft_store",
            "cli",
        ],
    ),
    (
        "src/state/",
        &[
            "node",
            "rollout",
            "rpc",
            "agent",
            "raft",
            "raft_store",
            "cli",
        ],
    ),
    (
        "src/release/",
        &[
            "node",
            "rollout",
            "rpc",
            "agent",
            "raft",
            "raft_store",
            "cli",
            "state",
        ],
    ),
];

fn modules_import_only_downwards(path: &str, text: &str) -> Vec<Violation> {
    let Some((layer, forbidden)) = LAYERS.iter().find(|(prefix, _)| path.starts_with(prefix))
    else {
        return Vec::new();
    };
    let code = match text.find("#[cfg(test)]\nmod tests") {
        Some(tests) => &text[..tests],
        None => text,
    };
    let mut found: Vec<Violation> = Code::lex(code)
        .paths()
        .into_iter()
        .filter(|p| p.segments.len() > 1 && p.segments[0] == "crate")
        .filter(|p| forbidden.contains(&p.segments[1].as_str()))
        .map(|p| Violation {
            line: p.line,
            message: format!(
                "imports crate::{}: {layer} may not depend on {}; dependencies point \
                 node -> {{rollout, agent, raft}} -> rpc -> {{api, release, state}} \
                 (add a trait in the lower module and implement it above)",
                p.segments[1],
                forbidden.join(", ")
            ),
        })
        .collect();
    found.dedup_by_key(|v| v.line);
    found
}

/// The crates `text` refers to by path (`name::..`, `use name`, `extern crate name`) whose
/// name satisfies `wanted`, with their lines.
fn crate_uses(text: &str, wanted: impl Fn(&str) -> bool) -> impl Iterator<Item = (usize, String)> {
    let code = Code::lex(text);
    let mut found: Vec<(usize, String)> = code
        .paths()
        .into_iter()
        .filter(|p| wanted(&p.segments[0]))
        .map(|p| (p.line, p.segments[0].clone()))
        .collect();
    found.dedup();
    found.into_iter()
}

// ---- a small Rust lexer -------------------------------------------------------------------

/// A token of code: comments, string and character literals and numbers are dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Ident(String),
    /// `::`
    PathSep,
    Punct(char),
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    line: usize,
}

/// A path as written (`a::b::c`, or one leaf of a `use` tree), on the line of its last part.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CodePath {
    segments: Vec<String>,
    line: usize,
}

struct Code {
    tokens: Vec<Token>,
}

impl Code {
    fn lex(text: &str) -> Self {
        let chars: Vec<char> = text.chars().collect();
        let at = |i: usize| chars.get(i).copied().unwrap_or('\0');
        let mut tokens = Vec::new();
        let mut line = 1;
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            if c == '\n' {
                line += 1;
                i += 1;
            } else if c.is_whitespace() {
                i += 1;
            } else if c == '/' && at(i + 1) == '/' {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            } else if c == '/' && at(i + 1) == '*' {
                let mut depth = 0;
                while i < chars.len() {
                    if chars[i] == '/' && at(i + 1) == '*' {
                        depth += 1;
                        i += 2;
                    } else if chars[i] == '*' && at(i + 1) == '/' {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        line += usize::from(chars[i] == '\n');
                        i += 1;
                    }
                }
            } else if c == '"' {
                i = skip_string(&chars, i + 1, &mut line);
            } else if c == '\'' {
                if at(i + 1) == '\\' {
                    // An escaped character literal: '\n', '\'', '\u{1F600}'.
                    i += 3;
                    while i < chars.len() && chars[i] != '\'' {
                        i += 1;
                    }
                    i += 1;
                } else if at(i + 2) == '\'' {
                    i += 3;
                } else {
                    // A lifetime or label: its name follows as an identifier.
                    tokens.push(Token {
                        tok: Tok::Punct('\''),
                        line,
                    });
                    i += 1;
                }
            } else if c.is_ascii_digit() {
                while at(i).is_alphanumeric() || at(i) == '_' {
                    i += 1;
                }
            } else if c.is_alphabetic() || c == '_' {
                let start = i;
                while at(i).is_alphanumeric() || at(i) == '_' {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let raw_prefix = matches!(word.as_str(), "r" | "br" | "cr");
                if raw_prefix && (at(i) == '"' || (at(i) == '#' && matches!(at(i + 1), '#' | '"')))
                {
                    i = skip_raw_string(&chars, i, &mut line);
                } else if matches!(word.as_str(), "b" | "c") && at(i) == '"' {
                    i = skip_string(&chars, i + 1, &mut line);
                } else if word == "b" && at(i) == '\'' {
                    // A byte literal: continue at the quote as a character literal.
                    continue;
                } else if word == "r" && at(i) == '#' {
                    // A raw identifier, r#type: the name follows.
                    i += 1;
                } else {
                    tokens.push(Token {
                        tok: Tok::Ident(word),
                        line,
                    });
                }
            } else if c == ':' && at(i + 1) == ':' {
                tokens.push(Token {
                    tok: Tok::PathSep,
                    line,
                });
                i += 2;
            } else {
                tokens.push(Token {
                    tok: Tok::Punct(c),
                    line,
                });
                i += 1;
            }
        }
        Self { tokens }
    }

    fn tok(&self, at: usize) -> Option<&Tok> {
        self.tokens.get(at).map(|t| &t.tok)
    }

    fn punct_at(&self, at: usize, c: char) -> bool {
        self.tok(at) == Some(&Tok::Punct(c))
    }

    fn ident_at(&self, at: usize, word: &str) -> bool {
        matches!(self.tok(at), Some(Tok::Ident(w)) if w == word)
    }

    /// Every path in the code: each leaf of a `use` tree (`use a::{b, c::d}` gives `a::b`
    /// and `a::c::d`), `extern crate` names, and every `a::b..` written elsewhere.
    fn paths(&self) -> Vec<CodePath> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < self.tokens.len() {
            if self.ident_at(at, "use") {
                at += 1;
                self.use_tree(&mut at, &[], &mut out);
            } else if self.ident_at(at, "extern") && self.ident_at(at + 1, "crate") {
                if let Some(Tok::Ident(name)) = self.tok(at + 2) {
                    out.push(CodePath {
                        segments: vec![name.clone()],
                        line: self.tokens[at + 2].line,
                    });
                }
                at += 3;
            } else if let Some(path) = self.path_expr(&mut at) {
                out.push(path);
            } else {
                at += 1;
            }
        }
        out
    }

    /// A path outside `use`, starting at `at` (`a::b`, `::a::b`); a lone name is no path.
    fn path_expr(&self, at: &mut usize) -> Option<CodePath> {
        let starts_here = match self.tok(*at) {
            Some(Tok::Ident(_)) => *at == 0 || self.tok(*at - 1) != Some(&Tok::PathSep),
            Some(Tok::PathSep) => matches!(self.tok(*at + 1), Some(Tok::Ident(_))),
            _ => false,
        };
        if !starts_here {
            return None;
        }
        let mut next = *at + usize::from(self.tok(*at) == Some(&Tok::PathSep));
        let mut segments = Vec::new();
        let mut line = 0;
        while let Some(Tok::Ident(name)) = self.tok(next) {
            segments.push(name.clone());
            line = self.tokens[next].line;
            next += 1;
            if self.tok(next) == Some(&Tok::PathSep)
                && matches!(self.tok(next + 1), Some(Tok::Ident(_)))
            {
                next += 1;
            } else {
                break;
            }
        }
        *at = next;
        (segments.len() > 1).then_some(CodePath { segments, line })
    }

    /// Reads one `use` tree at `at` below `prefix`, pushing a path per leaf.
    fn use_tree(&self, at: &mut usize, prefix: &[String], out: &mut Vec<CodePath>) {
        let mut path = prefix.to_vec();
        if self.tok(*at) == Some(&Tok::PathSep) {
            *at += 1;
        }
        loop {
            match self.tok(*at) {
                Some(Tok::Ident(name)) => {
                    let line = self.tokens[*at].line;
                    // `a::{self}` names `a` itself.
                    if name != "self" || path.is_empty() {
                        path.push(name.clone());
                    }
                    *at += 1;
                    if self.tok(*at) == Some(&Tok::PathSep) {
                        *at += 1;
                        continue;
                    }
                    if self.ident_at(*at, "as") {
                        *at += 2;
                    }
                    out.push(CodePath {
                        segments: path,
                        line,
                    });
                    return;
                }
                Some(Tok::Punct('*')) => {
                    if !path.is_empty() {
                        out.push(CodePath {
                            segments: path,
                            line: self.tokens[*at].line,
                        });
                    }
                    *at += 1;
                    return;
                }
                Some(Tok::Punct('{')) => {
                    *at += 1;
                    loop {
                        match self.tok(*at) {
                            None => return,
                            Some(Tok::Punct('}')) => {
                                *at += 1;
                                return;
                            }
                            Some(Tok::Punct(',')) => *at += 1,
                            Some(_) => {
                                let before = *at;
                                self.use_tree(at, &path, out);
                                if *at == before {
                                    *at += 1;
                                }
                            }
                        }
                    }
                }
                _ => return,
            }
        }
    }
}

/// Skips a string's body from just after its opening quote; returns the index after it.
fn skip_string(chars: &[char], mut i: usize, line: &mut usize) -> usize {
    while i < chars.len() && chars[i] != '"' {
        if chars[i] == '\\' {
            i += 1;
        }
        if chars.get(i) == Some(&'\n') {
            *line += 1;
        }
        i += 1;
    }
    i + 1
}

/// Skips a raw string from its first `#` or quote (after `r`); returns the index after it.
fn skip_raw_string(chars: &[char], mut i: usize, line: &mut usize) -> usize {
    let mut hashes = 0;
    while chars.get(i) == Some(&'#') {
        hashes += 1;
        i += 1;
    }
    i += 1; // the opening quote
    while i < chars.len() {
        if chars[i] == '"' && (1..=hashes).all(|k| chars.get(i + k) == Some(&'#')) {
            return i + 1 + hashes;
        }
        if chars[i] == '\n' {
            *line += 1;
        }
        i += 1;
    }
    i
}

// ---- self-tests: each rule fires on a violation and not on a clean sample ----------------

/// The lines a rule reports for `text` at `path`.
fn lines(rule: Rule, path: &str, text: &str) -> Vec<usize> {
    rule(path, text).into_iter().map(|v| v.line).collect()
}

#[test]
fn each_rule_fires_on_a_violation_and_not_on_a_clean_sample() {
    // (rule, path, text, lines it must report)
    let cases: &[(&str, Rule, &str, &str, &[usize])] = &[
        ("missing doc line", doc_line, "src/x.rs", "use std::fmt;\n", &[1]),
        (
            "rpc importing the node",
            modules_import_only_downwards,
            "src/rpc/server.rs",
            "//! x\nuse crate::node::NodeHandle;\nuse crate::{api, rollout::Plan};\n",
            &[2, 3],
        ),
        (
            "rollout importing rpc through a path",
            modules_import_only_downwards,
            "src/rollout/drive.rs",
            "//! x\nfn f() { crate::rpc::ControlClient::new(\"a\"); }\n",
            &[2],
        ),
        (
            "downward imports and test modules",
            modules_import_only_downwards,
            "src/rpc/agent.rs",
            "//! x\nuse crate::api::ApiError;\n#[cfg(test)]\nmod tests {\n    use crate::agent::Agent;\n}\n",
            &[],
        ),
        (
            "node may import anything",
            modules_import_only_downwards,
            "src/node/mod.rs",
            "//! x\nuse crate::rollout::Cluster;\nuse crate::rpc::serve;\n",
            &[],
        ),
        ("plain comment first", doc_line, "tests/x.rs", "// a comment\n", &[1]),
        ("doc line", doc_line, "examples/x.rs", "//! What it is.\nfn main() {}\n", &[]),
        (
            "sled in rollout",
            sled_only_in_raft_store,
            "src/rollout/x.rs",
            "//! x\nuse sled::Db;\n",
            &[2],
        ),
        (
            "sled in a use group",
            sled_only_in_raft_store,
            "src/node/x.rs",
            "//! x\nuse {std::fmt, sled};\nfn f() { let t: sled::Tree; }\n",
            &[2, 3],
        ),
        (
            "extern crate sled",
            sled_only_in_raft_store,
            "tests/x.rs",
            "//! x\nextern crate sled;\n",
            &[2],
        ),
        (
            "sled inside raft_store",
            sled_only_in_raft_store,
            "src/raft_store/x.rs",
            "//! x\nuse sled::Db;\n",
            &[],
        ),
        (
            "sled only in comments and strings",
            sled_only_in_raft_store,
            "src/rollout/x.rs",
            "//! on sled\n/* sled::Db */ const S: &str = \"sled::Db\";\nlet sled = r#\"use sled;\"#;\n",
            &[],
        ),
        (
            "a type of our own that ends in sled",
            sled_only_in_raft_store,
            "src/x.rs",
            "//! x\nuse crate::raft_store::sled_backed;\nfn f() { crate::sled::x(); }\n",
            &[],
        ),
        (
            "tonic in node",
            tonic_and_prost_only_in_rpc,
            "src/node/x.rs",
            "//! x\nfn f() -> tonic::Status { todo!() }\n",
            &[2],
        ),
        (
            "prost and tonic_prost",
            tonic_and_prost_only_in_rpc,
            "src/agent/x.rs",
            "//! x\nuse prost::Message;\nuse ::tonic_prost::ProstCodec;\n",
            &[2, 3],
        ),
        (
            "tonic inside rpc",
            tonic_and_prost_only_in_rpc,
            "src/rpc/x.rs",
            "//! x\nuse tonic::Status;\n",
            &[],
        ),
        (
            "monotonic is not tonic",
            tonic_and_prost_only_in_rpc,
            "src/raft/x.rs",
            "//! x\nlet monotonic = 1;\nfn f() { monotonic::now(); crate::rpc::tonic_free(); }\n",
            &[],
        ),
        (
            "println in node",
            stdout_only_in_cli,
            "src/node/x.rs",
            "//! x\nfn f() {\n    println!(\"up\");\n    print!(\"x\");\n}\n",
            &[3, 4],
        ),
        (
            "std::io::stdout",
            stdout_only_in_cli,
            "src/agent/x.rs",
            "//! x\nuse std::io::{self, stdout};\nfn f() { io::stdout().flush(); }\n",
            &[2, 3],
        ),
        (
            "eprintln, a child's stdout and the cli",
            stdout_only_in_cli,
            "src/node/x.rs",
            "//! x\nfn f() {\n    eprintln!(\"x\");\n    cmd.stdout(Stdio::piped());\n    out.stdout;\n}\n",
            &[],
        ),
        (
            "println in the cli",
            stdout_only_in_cli,
            "src/cli/x.rs",
            "//! x\nfn f() { println!(\"x\"); }\n",
            &[],
        ),
        (
            "println in a test binary",
            stdout_only_in_cli,
            "tests/it/x.rs",
            "//! x\nfn f() { println!(\"x\"); }\n",
            &[],
        ),
        (
            "tokio and a clock in the engine",
            pure_cores_do_no_io,
            "src/rollout/engine.rs",
            "//! x\nuse tokio::time::sleep;\nfn f() { let t = std::time::Instant::now(); }\n",
            &[2, 3],
        ),
        (
            "std::fs and std::net in state",
            pure_cores_do_no_io,
            "src/state/x.rs",
            "//! x\nuse std::{fs, net::SocketAddr};\nfn f() { std::fs::read(\"x\"); }\n",
            &[2, 2, 3],
        ),
        (
            "SystemTime in the manifest and tokio in engine tests",
            pure_cores_do_no_io,
            "src/rollout/engine/tests.rs",
            "//! x\n#[tokio::test]\nasync fn t() {}\nfn f() { SystemTime::now(); }\n",
            &[2, 4],
        ),
        (
            "the clock module in auto",
            pure_cores_do_no_io,
            "src/rollout/auto.rs",
            "//! x\nfn f() { crate::clock::unix_ms(); }\n",
            &[2],
        ),
        (
            "key files read in the signature check",
            pure_cores_do_no_io,
            "src/release/signature.rs",
            "//! x\nfn f() { std::fs::read_to_string(\"release.pub\"); }\n",
            &[2],
        ),
        (
            "a pure core that takes the time as a value",
            pure_cores_do_no_io,
            "src/release/manifest.rs",
            "//! reads no Instant\nuse std::time::Duration;\nfn f(now_ms: u64, d: Duration) {}\n",
            &[],
        ),
        (
            "the runtime may use tokio",
            pure_cores_do_no_io,
            "src/rollout/runtime.rs",
            "//! x\nuse tokio::time::Instant;\n",
            &[],
        ),
    ];
    for (name, rule, path, text, expected) in cases {
        assert_eq!(
            &lines(*rule, path, text),
            expected,
            "{name}: {path}\n{text}"
        );
    }
}

#[test]
fn a_failure_names_the_crate_and_the_fix() {
    let found = sled_only_in_raft_store("src/rollout/x.rs", "//! x\nuse sled::Db;\n");
    assert_eq!(found.len(), 1);
    assert!(
        found[0].message.contains("`sled`") && found[0].message.contains("src/raft_store/"),
        "{}",
        found[0].message
    );
}

#[test]
fn the_lexer_skips_literals_and_keeps_line_numbers() {
    let text = "//! x\nlet a = 'x'; let b = '\\''; let c = b'\"';\nlet s = \"two\nlines\";\nfn f<'a>(x: &'a str) { sled::x(); }\n";
    assert_eq!(lines(sled_only_in_raft_store, "src/x.rs", text), [5]);
    let raw = "//! x\nlet s = r##\"a \"# sled::x\"##;\nlet t = br\"sled::y\";\ntokio::spawn(f);\n";
    assert_eq!(lines(pure_cores_do_no_io, "src/state/x.rs", raw), [4]);
}
