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
    if !root.has_error() {
        return Vec::new();
    }
    let mut diagnostics = Vec::new();
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
    fn broken_powershell_is_located() {
        let diagnostics = check(
            ScriptLanguage::PowerShell,
            "Write-Host 'a'\nif ($x -eq 1) {\n  Write-Host 'b'\n",
        );
        assert!(!diagnostics.is_empty());
        assert!(describe(&diagnostics).contains(':'), "{diagnostics:?}");
    }
}
