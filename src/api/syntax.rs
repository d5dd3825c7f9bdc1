//! Script syntax checks with tree-sitter grammars (bash for Bash and sh, PowerShell
//! for PowerShell). A broken script is reported with line and column before it ever
//! reaches a host.

use tree_sitter::{Node, Parser};

use super::script::{ScriptLanguage, SyntaxDiagnostic};

/// Most diagnostics reported for one script; the rest are summarised by the first ones.
pub const MAX_DIAGNOSTICS: usize = 20;

/// Parses `content` as `language` and returns its syntax errors (empty when it parses).
pub fn check(language: ScriptLanguage, content: &str) -> Vec<SyntaxDiagnostic> {
    let grammar = match language {
        ScriptLanguage::PowerShell => tree_sitter_powershell::LANGUAGE,
        ScriptLanguage::Bash | ScriptLanguage::Sh => tree_sitter_bash::LANGUAGE,
    };
    let mut parser = Parser::new();
    parser
        .set_language(&grammar.into())
        .expect("bundled grammar matches the tree-sitter version");
    let Some(tree) = parser.parse(content, None) else {
        return vec![SyntaxDiagnostic {
            line: 1,
            column: 1,
            message: "the parser gave up on this script".into(),
        }];
    };
    let root = tree.root_node();
    let mut diagnostics = Vec::new();
    if language != ScriptLanguage::PowerShell {
        shell_grammar_gaps(root, content, &mut diagnostics);
    }
    if !root.has_error() {
        return diagnostics;
    }
    collect(root, content, &mut diagnostics);
    if diagnostics.is_empty() {
        // has_error() without a located ERROR/MISSING node: report the root.
        diagnostics.push(SyntaxDiagnostic {
            line: 1,
            column: 1,
            message: "syntax error".into(),
        });
    }
    diagnostics
}

fn collect(node: Node<'_>, content: &str, out: &mut Vec<SyntaxDiagnostic>) {
    if out.len() >= MAX_DIAGNOSTICS || !node.has_error() {
        return;
    }
    if node.is_missing() {
        out.push(diagnostic(
            node,
            format!("missing {}", describe_kind(node.kind())),
        ));
        return;
    }
    if node.is_error() {
        let text = node.utf8_text(content.as_bytes()).unwrap_or_default();
        let snippet: String = text
            .lines()
            .next()
            .unwrap_or_default()
            .chars()
            .take(40)
            .collect();
        let message = if snippet.trim().is_empty() {
            "syntax error".to_string()
        } else {
            format!("syntax error near `{}`", snippet.trim())
        };
        out.push(diagnostic(node, message));
        return;
    }
    let mut cursor = node.walk();
    for child in node.children(&mut cursor) {
        collect(child, content, out);
    }
}

/// Reserved words that tree-sitter-bash accepts as ordinary command names when they
/// are out of place, although every POSIX shell rejects them there.
const MISPLACED_RESERVED_WORDS: &[&str] =
    &["then", "else", "elif", "fi", "do", "done", "esac", "}"];

/// Errors the bash grammar tolerates but the shells do not: a reserved word used as a
/// command (a stray `fi` or `done`), and an empty `then`, `else` or `do` body.
fn shell_grammar_gaps(node: Node<'_>, content: &str, out: &mut Vec<SyntaxDiagnostic>) {
    if out.len() >= MAX_DIAGNOSTICS {
        return;
    }
    match node.kind() {
        "command" => {
            if let Some(name) = node.child_by_field_name("name")
                && let Ok(word) = name.utf8_text(content.as_bytes())
                && MISPLACED_RESERVED_WORDS.contains(&word)
            {
                out.push(diagnostic(
                    name,
                    format!("syntax error near unexpected `{word}`"),
                ));
            }
        }
        "if_statement" | "elif_clause" | "else_clause" | "do_group" => {
            let opener = match node.kind() {
                "if_statement" | "elif_clause" => "then",
                "else_clause" => "else",
                _ => "do",
            };
            let mut cursor = node.walk();
            let children: Vec<Node<'_>> = node.children(&mut cursor).collect();
            if let Some(position) = children.iter().position(|c| c.kind() == opener) {
                let has_body = children[position + 1..]
                    .iter()
                    .take_while(|c| !matches!(c.kind(), "elif_clause" | "else_clause"))
                    .any(|c| c.is_named() && c.kind() != "comment");
                if !has_body {
                    out.push(diagnostic(
                        children[position],
                        format!("syntax error: `{opener}` is followed by no command"),
                    ));
                }
            }
        }
        _ => {}
    }
    let mut cursor = node.walk();
    for child in node.children(&mut cursor) {
        shell_grammar_gaps(child, content, out);
    }
}

fn describe_kind(kind: &str) -> String {
    if kind.chars().all(|c| c.is_ascii_punctuation())
        || kind.chars().all(|c| c.is_ascii_lowercase()) && kind.len() <= 5
    {
        format!("`{kind}`")
    } else {
        kind.replace('_', " ")
    }
}

fn diagnostic(node: Node<'_>, message: String) -> SyntaxDiagnostic {
    let position = node.start_position();
    SyntaxDiagnostic {
        line: position.row as u32 + 1,
        column: position.column as u32 + 1,
        message,
    }
}

/// `line:column: message` for each diagnostic, joined with `; `.
pub fn describe(diagnostics: &[SyntaxDiagnostic]) -> String {
    diagnostics
        .iter()
        .map(|d| format!("{}:{}: {}", d.line, d.column, d.message))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_scripts_have_no_diagnostics() {
        assert!(
            check(
                ScriptLanguage::Bash,
                "set -eu\nif [ -f /etc/os-release ]; then\n  echo ok\nfi\n"
            )
            .is_empty()
        );
        assert!(check(ScriptLanguage::Sh, "for x in a b; do echo \"$x\"; done\n").is_empty());
        let ps = "param([string]$Name = 'x')\nif (Test-Path $Name) { Write-Host 'found'; exit 0 } else { exit 1 }\n";
        assert!(
            check(ScriptLanguage::PowerShell, ps).is_empty(),
            "{:?}",
            check(ScriptLanguage::PowerShell, ps)
        );
    }

    #[test]
    fn broken_bash_is_located() {
        let diagnostics = check(
            ScriptLanguage::Bash,
            "echo start\nif [ -f x ]; then\n  echo y\n",
        );
        assert!(!diagnostics.is_empty());
        assert!(diagnostics[0].line >= 2, "{diagnostics:?}");
    }

    #[test]
    fn misplaced_reserved_words_and_empty_bodies_are_errors() {
        for (script, line) in [
            ("echo start\nfi\n", 2),
            ("then echo\n", 1),
            ("echo a\ndone\n", 2),
            ("if true; then\nfi\n", 1),
            ("for x in a; do\ndone\n", 1),
            ("if true; then echo a; else\nfi\n", 1),
        ] {
            let diagnostics = check(ScriptLanguage::Bash, script);
            assert!(!diagnostics.is_empty(), "{script:?} was accepted");
            assert_eq!(diagnostics[0].line, line, "{script:?}: {diagnostics:?}");
        }
        for script in [
            "echo fi\n",
            "if true; then echo a; elif false; then echo b; else echo c; fi\n",
            "case a in\nesac\n",
        ] {
            assert!(
                check(ScriptLanguage::Sh, script).is_empty(),
                "{script:?}: {:?}",
                check(ScriptLanguage::Sh, script)
            );
        }
    }

    #[test]
    fn broken_powershell_is_located() {
        let diagnostics = check(
            ScriptLanguage::PowerShell,
            "Write-Host 'a'\nif ($x -eq 1) {\n  Write-Host 'b'\n",
        );
        assert!(!diagnostics.is_empty());
        assert!(describe(&diagnostics).contains(':'), "{diagnostics:?}");
    }
}
