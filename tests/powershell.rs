//! The PowerShell the agent generates, read the way PowerShell reads it. Structure comes
//! from the tree-sitter PowerShell grammar; where a single-quoted literal ends comes
//! from PowerShell's own tokenizer rule, which the grammar does not know: any of
//! `'`, U+2018, U+2019, U+201A and U+201B opens and closes a literal, and two of them in
//! a row stand for the second (`CharExtensions.IsSingleQuote`, `ScanStringLiteral`).
//!
//! Arbitrary values (every quote character, `$`, backticks, newlines, any NUL-free
//! unicode) go through every generated script; each must come out as exactly the
//! literals the script has for a harmless value, with the same code around them, and
//! each literal must end where PowerShell ends it.

use fleetpatch::agent::patcher::windows;
use fleetpatch::agent::powershell::{self, DOUBLE_QUOTES, SINGLE_QUOTES, quote};
use fleetpatch::api::plan::{PatchClassification, PatchSelection};
use fleetpatch::api::task::{
    ChangeRegistryKey, RegistryValueType, UninstallSoftware, VersionMatch,
};
use proptest::prelude::*;
use tree_sitter::{Node, Parser, Tree};

fn parse(script: &str) -> Tree {
    let mut parser = Parser::new();
    parser
        .set_language(&tree_sitter_powershell::LANGUAGE.into())
        .unwrap();
    let tree = parser.parse(script, None).unwrap();
    assert!(
        !tree.root_node().has_error(),
        "does not parse:\n{}\n{script}",
        tree.root_node().to_sexp()
    );
    tree
}

const LITERAL: &str = "verbatim_string_characters";

/// The tokens of `script` in order, as (kind, text): the leaves of the tree, with
/// single-quoted literals as one token each.
fn tokens(script: &str) -> Vec<(&'static str, String)> {
    fn walk(node: Node<'_>, script: &str, out: &mut Vec<(&'static str, String)>) {
        if node.kind() == LITERAL || node.child_count() == 0 {
            let text = node.utf8_text(script.as_bytes()).unwrap().to_string();
            out.push((node.kind(), text));
            return;
        }
        let mut cursor = node.walk();
        for child in node.children(&mut cursor) {
            walk(child, script, out);
        }
    }
    let tree = parse(script);
    let mut out = Vec::new();
    walk(tree.root_node(), script, &mut out);
    out
}

/// Reads the single-quoted literal at the start of `text` as PowerShell's tokenizer
/// does: its value, and the byte length of the literal.
fn powershell_literal(text: &str) -> (String, usize) {
    let mut chars = text.char_indices().peekable();
    let (_, open) = chars.next().expect("a literal");
    assert!(
        SINGLE_QUOTES.contains(&open),
        "not a single-quoted literal: {text}"
    );
    let mut value = String::new();
    while let Some((at, c)) = chars.next() {
        if SINGLE_QUOTES.contains(&c) {
            match chars.peek() {
                Some(&(_, next)) if SINGLE_QUOTES.contains(&next) => {
                    value.push(next);
                    chars.next();
                    continue;
                }
                _ => return (value, at + c.len_utf8()),
            }
        }
        value.push(c);
    }
    panic!("PowerShell would not end this literal: {text}");
}

/// Asserts that `script` (made with hostile values) is `baseline` (made with harmless
/// ones) but for the content of its literals, that PowerShell ends every literal where
/// the grammar does, and returns the literals' values.
fn same_code_other_literals(script: &str, baseline: &str) -> Vec<String> {
    let hostile = tokens(script);
    let harmless = tokens(baseline);
    fn kinds(tokens: &[(&'static str, String)]) -> Vec<&'static str> {
        tokens.iter().map(|(k, _)| *k).collect()
    }
    assert_eq!(
        kinds(&hostile),
        kinds(&harmless),
        "the code changed with the values:\n{script}"
    );
    let mut values = Vec::new();
    for ((kind, text), (_, base)) in hostile.iter().zip(&harmless) {
        if *kind == LITERAL {
            let (value, length) = powershell_literal(text);
            assert_eq!(
                length,
                text.len(),
                "PowerShell ends the literal {text:?} early: the rest would be code"
            );
            values.push(value);
        } else {
            assert_eq!(text, base, "code differs:\n{script}");
        }
    }
    values
}

fn hostile_char() -> impl Strategy<Value = char> {
    let special: Vec<char> = SINGLE_QUOTES
        .iter()
        .chain(&DOUBLE_QUOTES)
        .copied()
        .chain([
            '$', '`', '(', ')', '{', '}', '[', ']', ';', '&', '|', '#', '<', '>', '@', '-',
            '\u{2013}', '\u{2014}', '\n', '\r', '\t', ' ', '\\',
        ])
        .collect();
    prop_oneof![
        3 => prop::sample::select(special),
        2 => any::<char>().prop_filter("NUL-free", |c| *c != '\0'),
    ]
}

fn hostile_string() -> impl Strategy<Value = String> {
    prop::collection::vec(hostile_char(), 0..24).prop_map(|chars| chars.into_iter().collect())
}

fn registry(key: &str, value_type: RegistryValueType, name: &str, data: &str) -> String {
    powershell::change_registry_key(&ChangeRegistryKey {
        key_path: format!(r"HKEY_LOCAL_MACHINE\{key}"),
        value_type,
        value_name: name.into(),
        value_data: data.into(),
        create_if_missing: true,
    })
    .unwrap()
}

fn uninstall(key: &str, name: &str, version: &str) -> String {
    powershell::uninstall_software(&UninstallSoftware {
        uninstall_key: format!(r"HKEY_LOCAL_MACHINE\SOFTWARE\{key}"),
        display_name: name.into(),
        display_version: Some(version.into()),
        version_match: VersionMatch::Equals,
    })
}

fn windows_update(include: &[String], exclude: &[String]) -> String {
    windows::script(&PatchSelection {
        classifications: vec![PatchClassification::Security],
        include: include.to_vec(),
        exclude: exclude.to_vec(),
        skip: false,
        fail_when: Default::default(),
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn registry_values_stay_literals(
        key in hostile_string(),
        name in hostile_string().prop_filter("the empty name is the default value", |n| !n.is_empty()),
        data in hostile_string(),
        expand in any::<bool>(),
    ) {
        let value_type = if expand { RegistryValueType::REG_EXPAND_SZ } else { RegistryValueType::REG_SZ };
        let values = same_code_other_literals(
            &registry(&key, value_type, &name, &data),
            &registry("k", value_type, "n", "d"),
        );
        let path = format!(r"Registry::HKEY_LOCAL_MACHINE\{key}");
        prop_assert!(values.contains(&path));
        prop_assert!(values.contains(&name));
        prop_assert!(values.contains(&data));
    }

    #[test]
    fn multi_string_lines_stay_literals(
        lines in prop::collection::vec(
            hostile_string().prop_map(|l| l.replace(['\n', '\r'], "")), 1..5),
    ) {
        let harmless: Vec<&str> = lines.iter().map(|_| "line").collect();
        let values = same_code_other_literals(
            &registry("k", RegistryValueType::REG_MULTI_SZ, "n", &lines.join("\n")),
            &registry("k", RegistryValueType::REG_MULTI_SZ, "n", &harmless.join("\n")),
        );
        for line in &lines {
            prop_assert!(values.contains(line));
        }
    }

    #[test]
    fn uninstall_fields_stay_literals(
        key in hostile_string(),
        name in hostile_string(),
        version in hostile_string(),
    ) {
        let values = same_code_other_literals(
            &uninstall(&key, &name, &version),
            &uninstall("k", "n", "v"),
        );
        let path = format!(r"Registry::HKEY_LOCAL_MACHINE\SOFTWARE\{key}");
        prop_assert!(values.contains(&path));
        prop_assert!(values.contains(&name));
        prop_assert!(values.contains(&version));
    }

    #[test]
    fn patch_names_stay_literals(
        include in prop::collection::vec(hostile_string(), 0..4),
        exclude in prop::collection::vec(hostile_string(), 0..4),
    ) {
        let harmless = |names: &[String]| names.iter().map(|_| "KB1".to_string()).collect::<Vec<_>>();
        let values = same_code_other_literals(
            &windows_update(&include, &exclude),
            &windows_update(&harmless(&include), &harmless(&exclude)),
        );
        for name in include.iter().chain(&exclude) {
            prop_assert!(values.contains(name));
        }
    }

    #[test]
    fn the_script_path_stays_a_literal(path in hostile_string()) {
        let values = same_code_other_literals(
            &powershell::generated_script_loader(&path),
            &powershell::generated_script_loader(r"C:\state\work\pre-0.ps1"),
        );
        prop_assert!(values.contains(&path));
    }
}

#[test]
fn typographic_quotes_would_have_ended_an_apostrophe_only_literal() {
    // What quoting used to do: double only the apostrophe.
    let apostrophe_only = |v: &str| format!("'{}'", v.replace('\'', "''"));
    for quote_char in &SINGLE_QUOTES[1..] {
        let value = format!("{quote_char}; Remove-Item C:\\ -Recurse; {quote_char}");
        let old = apostrophe_only(&value);
        let (_, length) = powershell_literal(&old);
        assert!(length < old.len(), "{old}: PowerShell ends it early");
        let new = quote(&value);
        assert_eq!(powershell_literal(&new), (value.clone(), new.len()));
    }
}

/// The argument after `-Value` in the generated `New-ItemProperty` call.
fn value_argument(script: &str) -> (String, String) {
    fn find<'a>(node: Node<'a>, script: &str) -> Option<Node<'a>> {
        if node.kind() == "command_elements" {
            let mut cursor = node.walk();
            let elements: Vec<Node<'a>> = node
                .named_children(&mut cursor)
                .filter(|n| n.kind() != "command_argument_sep")
                .collect();
            for pair in elements.windows(2) {
                if pair[0].kind() == "command_parameter"
                    && pair[0].utf8_text(script.as_bytes()).unwrap() == "-Value"
                {
                    return Some(pair[1]);
                }
            }
        }
        let mut cursor = node.walk();
        let children: Vec<Node<'a>> = node.children(&mut cursor).collect();
        children.into_iter().find_map(|child| find(child, script))
    }
    let tree = parse(script);
    let argument = find(tree.root_node(), script).expect("a -Value argument");
    // array_literal_expression > unary_expression > what the argument is.
    let mut inner = argument;
    while matches!(
        inner.kind(),
        "array_literal_expression" | "unary_expression"
    ) && inner.named_child_count() == 1
    {
        inner = inner.named_child(0).unwrap();
    }
    (
        inner.kind().to_string(),
        argument.utf8_text(script.as_bytes()).unwrap().to_string(),
    )
}

#[test]
fn every_value_is_a_literal_or_parenthesised_where_powershell_parses_arguments() {
    // In argument mode `[` starts a bare word: `-Value [string[]]@('a')` binds a string.
    // (This grammar reads it as a cast; PowerShell does not, so a bare word or a cast
    // right after -Value is the bug.)
    for (value_type, data) in [
        (RegistryValueType::REG_SZ, "text"),
        (RegistryValueType::REG_EXPAND_SZ, r"%ProgramFiles%\App"),
        (RegistryValueType::REG_MULTI_SZ, "a\nb"),
        (RegistryValueType::REG_DWORD, "1"),
        (RegistryValueType::REG_QWORD, "1"),
        (RegistryValueType::REG_BINARY, "0100"),
    ] {
        let script = registry(r"SOFTWARE\Vendor", value_type, "Setting", data);
        let (kind, text) = value_argument(&script);
        assert!(
            matches!(kind.as_str(), "string_literal" | "parenthesized_expression"),
            "{value_type:?}: -Value {text} is a {kind}"
        );
        assert_ne!(kind, "generic_token");
        assert!(
            text.starts_with(['\'', '(']),
            "{value_type:?}: -Value {text}"
        );
    }
}

#[test]
fn the_default_value_is_set_by_its_provider_name() {
    let script = registry(r"SOFTWARE\Vendor", RegistryValueType::REG_SZ, "", "x");
    let literals: Vec<String> = tokens(&script)
        .into_iter()
        .filter(|(kind, _)| *kind == LITERAL)
        .map(|(_, text)| powershell_literal(&text).0)
        .collect();
    assert!(literals.contains(&"(default)".to_string()), "{script}");
    assert!(!literals.contains(&String::new()), "{script}");
    assert!(script.contains("-Name $name"), "{script}");
}

#[test]
fn windows_update_selects_categories_by_id() {
    let guid = regex::Regex::new("^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
        .unwrap();
    for classifications in [
        vec![PatchClassification::Security],
        vec![PatchClassification::Critical],
        vec![PatchClassification::Security, PatchClassification::Critical],
        vec![PatchClassification::Bugfix],
    ] {
        let script = windows::script(&PatchSelection {
            classifications: classifications.clone(),
            ..PatchSelection::default()
        });
        let line = script
            .lines()
            .find(|l| l.starts_with("$categories = "))
            .unwrap();
        let ids: Vec<String> = tokens(line)
            .into_iter()
            .filter(|(kind, _)| *kind == LITERAL)
            .map(|(_, text)| powershell_literal(&text).0)
            .collect();
        assert!(!ids.is_empty(), "{classifications:?}: {line}");
        for id in &ids {
            assert!(
                guid.is_match(id),
                "{classifications:?}: {id} is not a category ID"
            );
        }
        // Compared with the updates' category IDs, never with their localised names.
        assert!(script.contains("$_.CategoryID"), "{script}");
        assert!(!script.contains("$_.Name"), "{script}");
        assert!(!script.contains("Updates'"), "{script}");
    }
    let security = windows::script(&PatchSelection::default());
    assert!(security.contains("'0fa1201d-4330-4fa8-8ae9-b877473b6441'"));
    assert!(security.contains("'e6cf1350-c01b-414d-a61f-263d14d133b4'"));
}

#[test]
fn windows_update_checks_downloads_and_skips_optional_updates() {
    let script = windows::script(&PatchSelection::default());
    parse(&script);
    // Only what downloaded is installed; what did not is reported as failed.
    assert!(
        script.contains("$download = $downloader.Download()"),
        "{script}"
    );
    assert!(script.contains("$download.GetUpdateResult($i)"), "{script}");
    assert!(script.contains("'download'"), "{script}");
    assert!(script.contains("$installer.Updates = $ready"), "{script}");
    // Optional (BrowseOnly) updates only when named in include.
    assert!(
        script.contains("if ($update.BrowseOnly -and -not $included) { continue }"),
        "{script}"
    );
    // An API error still prints the result line, with the error.
    assert!(
        script.contains("} catch {\n  $errorText = $_.Exception.Message"),
        "{script}"
    );
    let catch = script.find("} catch {").unwrap();
    let result = script.find("Write-Output ('FLEETPATCH-RESULT '").unwrap();
    assert!(catch < result, "the result line is printed after the catch");
}

#[test]
fn the_loader_switches_the_console_to_utf8_and_catches_everything() {
    let loader = powershell::generated_script_loader(r"C:\var\lib\fleetpatch\work\j\pre-0.ps1");
    parse(&loader);
    assert!(loader.starts_with("$ErrorActionPreference = 'Stop'\ntry { [Console]::OutputEncoding = New-Object System.Text.UTF8Encoding $false } catch { }\n"));
    assert!(loader.contains("Get-Content -LiteralPath $path -Raw -Encoding UTF8"));
    assert!(loader.contains("try {\n  & $block\n} catch {"));
}

/// For every block of `script` that ends in `exit`: the last message it wrote with
/// Write-Host (quotes stripped) and its exit statement, in the order of the script.
fn exits_with_messages(script: &str) -> Vec<(String, String)> {
    fn walk(node: Node<'_>, script: &str, out: &mut Vec<(String, String)>) {
        if node.kind() == "statement_list" {
            let mut message = String::new();
            let mut cursor = node.walk();
            for statement in node.named_children(&mut cursor) {
                let text = statement.utf8_text(script.as_bytes()).unwrap();
                match statement.kind() {
                    "pipeline" => {
                        if let Some(rest) = text.strip_prefix("Write-Host ") {
                            message = rest.trim_matches(['\'', '"']).to_string();
                        }
                    }
                    "flow_control_statement" if text.starts_with("exit") => {
                        out.push((message.clone(), text.to_string()));
                    }
                    _ => {}
                }
            }
        }
        let mut cursor = node.walk();
        for child in node.children(&mut cursor) {
            walk(child, script, out);
        }
    }
    let tree = parse(script);
    let mut out = Vec::new();
    walk(tree.root_node(), script, &mut out);
    out
}

#[test]
fn uninstall_exits_not_applicable_exactly_where_nothing_was_there_to_remove() {
    let not_applicable = format!("exit {}", powershell::NOT_APPLICABLE_EXIT);
    let script = uninstall(
        r"Microsoft\Windows\CurrentVersion\Uninstall\{1E0D5689-40F1-4E46-ABBB-EAAC68B5CD89}",
        "App",
        "1.0",
    );
    let exits = exits_with_messages(&script);
    let skipped: Vec<&(String, String)> = exits
        .iter()
        .filter(|(m, _)| m.starts_with("skipped:"))
        .collect();
    // No key in either view, another DisplayName, another DisplayVersion.
    assert_eq!(skipped.len(), 3, "{exits:#?}");
    for (message, exit) in &exits {
        assert_eq!(
            message.starts_with("skipped:"),
            *exit == not_applicable,
            "{message:?} ends with {exit}"
        );
    }
    let exit_of = |start: &str| {
        exits
            .iter()
            .find(|(m, _)| m.starts_with(start))
            .map(|(_, e)| e.as_str())
            .unwrap_or_else(|| panic!("no block writes {start:?}: {exits:#?}"))
    };
    // What msiexec cannot remove, or did not, fails: a Burn bundle or NSIS setup,
    // msiexec's "unknown product" (1605), a key that is still there.
    assert_eq!(exit_of("cannot uninstall"), "exit 1");
    assert_eq!(exit_of("msiexec does not know"), "exit 1");
    assert_eq!(exit_of("msiexec exited $code but"), "exit 1");
    assert_eq!(exit_of("uninstalled; msiexec exit code"), "exit 10");
    let done: Vec<&str> = exits
        .iter()
        .filter(|(m, _)| m == "uninstalled")
        .map(|(_, e)| e.as_str())
        .collect();
    assert_eq!(done, ["exit 0"], "{exits:#?}");
}

/// Every node of `kind` under `node`, in the order of the script.
fn nodes_of<'a>(node: Node<'a>, kind: &str, out: &mut Vec<Node<'a>>) {
    if node.kind() == kind {
        out.push(node);
    }
    let mut cursor = node.walk();
    for child in node.children(&mut cursor) {
        nodes_of(child, kind, out);
    }
}

/// The condition of the nearest `if` (or `elseif`) around `node`, and which it was.
fn enclosing_condition<'a>(node: Node<'a>, script: &'a str) -> Option<(&'static str, &'a str)> {
    let mut current = node.parent();
    while let Some(n) = current {
        if n.kind() == "if_statement" || n.kind() == "elseif_clause" {
            let condition = n.child_by_field_name("condition")?;
            // Inside the block it guards, not inside the condition itself.
            if condition.byte_range().contains(&node.start_byte()) {
                current = n.parent();
                continue;
            }
            let kind = if n.kind() == "if_statement" {
                "if"
            } else {
                "elseif"
            };
            return Some((kind, condition.utf8_text(script.as_bytes()).unwrap()));
        }
        current = n.parent();
    }
    None
}

/// Qualys compares the value named `Version` under the uninstall key; without one the
/// agent falls back to `DisplayVersion`. Value names are read with `GetValue`, which
/// is case-insensitive as the registry is; the version string must equal exactly
/// (ordinal), never by PowerShell's case-insensitive `-eq`/`-ne`.
#[test]
fn uninstall_compares_the_version_value_exactly_falling_back_to_display_version() {
    let script = uninstall(
        r"Microsoft\Windows\CurrentVersion\Uninstall\{1E0D5689-40F1-4E46-ABBB-EAAC68B5CD89}",
        "App",
        "8.5",
    );
    let tree = parse(&script);
    let text = |n: Node<'_>| n.utf8_text(script.as_bytes()).unwrap();
    let mut calls = Vec::new();
    nodes_of(tree.root_node(), "invokation_expression", &mut calls);
    let get_value: Vec<(Node<'_>, String)> = calls
        .iter()
        .filter(|call| {
            call.named_child(0).map(text) == Some("$item")
                && call.named_child(1).map(text) == Some("GetValue")
        })
        .map(|call| {
            let arguments = call.named_child(2).map(text).unwrap_or_default();
            (*call, arguments.to_string())
        })
        .collect();
    let names: Vec<&str> = get_value.iter().map(|(_, a)| a.as_str()).collect();
    assert_eq!(
        names,
        ["('Version')", "('DisplayVersion')"],
        "Version is read first\n{script}"
    );
    assert_eq!(
        enclosing_condition(get_value[1].0, &script),
        Some(("if", "$null -eq $installedVersion")),
        "DisplayVersion is read only when there is no Version"
    );
    // The one comparison that skips: an ordinal equality of the version strings.
    let mut statements = Vec::new();
    nodes_of(tree.root_node(), "if_statement", &mut statements);
    // The innermost if around the message: the last, in the order of the script.
    let skip = statements
        .iter()
        .rfind(|s| text(**s).contains("skipped: left installed"))
        .expect("an if skips when the version differs");
    let condition = text(skip.child_by_field_name("condition").unwrap());
    assert_eq!(
        condition,
        "-not [string]::Equals([string]$installedVersion, $displayVersion, [System.StringComparison]::Ordinal)"
    );
    // No case-insensitive comparison touches the wanted version or DisplayVersion:
    // only the check that a version was given at all.
    let mut comparisons = Vec::new();
    nodes_of(tree.root_node(), "comparison_expression", &mut comparisons);
    for comparison in comparisons {
        let has_operator = (0..comparison.child_count())
            .filter_map(|i| comparison.child(i))
            .any(|c| c.kind() == "comparison_operator");
        let text = text(comparison);
        if has_operator && (text.contains("$displayVersion") || text.contains(".DisplayVersion")) {
            assert_eq!(text, "$null -ne $displayVersion", "{script}");
        }
    }
}
