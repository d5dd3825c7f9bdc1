//! PowerShell generated for the Windows-only actions (registry changes, msiexec
//! uninstalls) and for the Windows Update patcher. Every value from a manifest enters
//! the code through [`quote`], as a single-quoted literal, never as code; script files
//! are UTF-8 with a byte order mark.

use crate::api::task::{ChangeRegistryKey, RegistryValueType, UninstallSoftware};

/// What PowerShell's tokenizer takes for a single quote (`CharExtensions.IsSingleQuote`):
/// the apostrophe and the typographic quotes U+2018 to U+201B.
pub const SINGLE_QUOTES: [char; 5] = ['\'', '\u{2018}', '\u{2019}', '\u{201A}', '\u{201B}'];

/// What it takes for a double quote (`IsDoubleQuote`). Generated code never puts a value
/// inside double quotes; the list is here so tests can throw these at [`quote`] too.
pub const DOUBLE_QUOTES: [char; 4] = ['"', '\u{201C}', '\u{201D}', '\u{201E}'];

pub fn is_single_quote(c: char) -> bool {
    SINGLE_QUOTES.contains(&c)
}

/// `value` as one PowerShell single-quoted string literal. Inside one, only single
/// quotes are special, and the tokenizer reads any two of them in a row as the second:
/// doubling every quote character keeps the value exact and the literal closed.
pub fn quote(value: &str) -> String {
    let mut literal = String::with_capacity(value.len() + 2);
    literal.push('\'');
    for c in value.chars() {
        if is_single_quote(c) {
            literal.push(c);
        }
        literal.push(c);
    }
    literal.push('\'');
    literal
}

/// `@('a', 'b')`: an array of single-quoted literals.
pub fn quote_list(values: impl IntoIterator<Item = impl AsRef<str>>) -> String {
    let quoted: Vec<String> = values.into_iter().map(|v| quote(v.as_ref())).collect();
    format!("@({})", quoted.join(", "))
}

/// UTF-8's byte order mark. Windows PowerShell 5.1 reads a `.ps1` file without one in
/// the ANSI code page, so every non-ASCII character of a script would change.
pub const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// The bytes of a `.ps1` file holding `text`: UTF-8 with a byte order mark.
pub fn script_file(text: &str) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(UTF8_BOM.len() + text.len());
    bytes.extend_from_slice(UTF8_BOM);
    bytes.extend_from_slice(text.as_bytes());
    bytes
}

/// Registry provider path for a key path like `HKEY_LOCAL_MACHINE\SOFTWARE\Vendor`.
fn provider_path(key_path: &str) -> String {
    quote(&format!("Registry::{key_path}"))
}

/// `New-ItemProperty -PropertyType` and the value expression for registry data.
fn property_value(
    value_type: RegistryValueType,
    data: &str,
) -> Result<(&'static str, String), String> {
    let number = || {
        data.parse::<u64>().map_err(|_| {
            format!(
                "{} data must be a decimal number, got {data:?}",
                value_type.as_str()
            )
        })
    };
    Ok(match value_type {
        RegistryValueType::REG_SZ => ("String", quote(data)),
        RegistryValueType::REG_EXPAND_SZ => ("ExpandString", quote(data)),
        RegistryValueType::REG_MULTI_SZ => {
            let lines: Vec<String> = data
                .split('\n')
                .map(|l| quote(l.trim_end_matches('\r')))
                .collect();
            ("MultiString", format!("[string[]]@({})", lines.join(", ")))
        }
        RegistryValueType::REG_DWORD => {
            let value = u32::try_from(number()?)
                .map_err(|_| format!("{data} does not fit in a REG_DWORD"))?;
            ("DWord", format!("([uint32]{value})"))
        }
        RegistryValueType::REG_QWORD => ("QWord", format!("([uint64]{})", number()?)),
        RegistryValueType::REG_BINARY => {
            // The number's little-endian bytes, without trailing zero bytes (at least one byte).
            let bytes = number()?.to_le_bytes();
            let used = bytes
                .iter()
                .rposition(|b| *b != 0)
                .map_or(1, |last| last + 1);
            let list: Vec<String> = bytes[..used].iter().map(|b| format!("0x{b:02x}")).collect();
            ("Binary", format!("([byte[]]@({}))", list.join(", ")))
        }
    })
}

const PRELUDE: &str = "$ErrorActionPreference = 'Stop'\n$ProgressPreference = 'SilentlyContinue'\n";

/// Script that sets one registry value. Exit 0 when set (or when the key is missing and
/// may not be created), 1 on error.
pub fn change_registry_key(change: &ChangeRegistryKey) -> Result<String, String> {
    let (property_type, value) = property_value(change.value_type, &change.value_data)?;
    let create = if change.create_if_missing {
        "$true"
    } else {
        "$false"
    };
    Ok(format!(
        r#"{PRELUDE}$path = {path}
$name = {name}
$createIfMissing = {create}
try {{
  if (-not (Test-Path -LiteralPath $path)) {{
    if (-not $createIfMissing) {{
      Write-Host "key $path does not exist and createIfMissing is false: nothing changed"
      exit 0
    }}
    New-Item -Path $path -Force | Out-Null
    Write-Host "created key $path"
  }}
  New-ItemProperty -LiteralPath $path -Name $name -PropertyType {property_type} -Value {value} -Force | Out-Null
  Write-Host "set $path\$name ({value_type})"
  exit 0
}} catch {{
  Write-Host "failed to set $path\$name : $($_.Exception.Message)"
  exit 1
}}
"#,
        path = provider_path(&change.key_path),
        name = quote(&change.value_name),
        value_type = change.value_type.as_str(),
    ))
}

/// Script that uninstalls an msiexec-installed product. Exit 0 when removed or nothing
/// matched, 10 when removed and a reboot is needed, 1 on failure.
pub fn uninstall_software(uninstall: &UninstallSoftware) -> String {
    let version = uninstall
        .display_version
        .as_deref()
        .map(quote)
        .unwrap_or_else(|| "$null".into());
    format!(
        r#"{PRELUDE}$key = {key}
$displayName = {name}
$displayVersion = {version}
if (-not (Test-Path -LiteralPath $key)) {{
  Write-Host "nothing to uninstall: $key does not exist"
  exit 0
}}
$entry = Get-ItemProperty -LiteralPath $key
if ($entry.DisplayName -ne $displayName) {{
  Write-Host "nothing to uninstall: DisplayName is '$($entry.DisplayName)', not '$displayName'"
  exit 0
}}
if ($null -ne $displayVersion -and $entry.DisplayVersion -ne $displayVersion) {{
  Write-Host "left installed: version $($entry.DisplayVersion) does not equal $displayVersion"
  exit 0
}}
$productCode = Split-Path -Leaf $key
if ($productCode -notmatch '^\{{[0-9A-Fa-f-]{{36}}\}}$') {{
  if ($entry.UninstallString -match '(\{{[0-9A-Fa-f-]{{36}}\}})') {{
    $productCode = $Matches[1]
  }} else {{
    Write-Host "cannot uninstall '$displayName': it is not an msiexec-based installer (no product code)"
    exit 1
  }}
}}
Write-Host "uninstalling $displayName $($entry.DisplayVersion) ($productCode)"
$process = Start-Process -FilePath 'msiexec.exe' -ArgumentList @('/x', $productCode, '/qn', '/norestart') -Wait -PassThru
switch ($process.ExitCode) {{
  0 {{ Write-Host 'uninstalled'; exit 0 }}
  1605 {{ Write-Host 'msiexec: product is not installed'; exit 0 }}
  1641 {{ Write-Host 'uninstalled; reboot initiated by the installer'; exit 10 }}
  3010 {{ Write-Host 'uninstalled; reboot needed'; exit 10 }}
  default {{ Write-Host "msiexec failed with exit code $($process.ExitCode)"; exit 1 }}
}}
"#,
        key = provider_path(&uninstall.uninstall_key),
        name = quote(&uninstall.display_name),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ScriptLanguage;
    use crate::api::syntax;
    use crate::api::task::VersionMatch;

    fn parses(script: &str) {
        let diagnostics = syntax::check(ScriptLanguage::PowerShell, script);
        assert!(
            diagnostics.is_empty(),
            "generated PowerShell does not parse: {}\n{script}",
            syntax::describe(&diagnostics)
        );
    }

    fn change(value_type: RegistryValueType, data: &str) -> ChangeRegistryKey {
        ChangeRegistryKey {
            key_path: r"HKEY_LOCAL_MACHINE\SOFTWARE\Vendor's App".into(),
            value_type,
            value_name: "Setting'; Remove-Item C:\\ -Recurse; '".into(),
            value_data: data.into(),
            create_if_missing: true,
        }
    }

    #[test]
    fn quoting_doubles_every_quote_character_powershell_knows() {
        assert_eq!(quote("it's"), "'it''s'");
        assert_eq!(
            quote("\u{2018}a\u{2019}b\u{201A}c\u{201B}"),
            "'\u{2018}\u{2018}a\u{2019}\u{2019}b\u{201A}\u{201A}c\u{201B}\u{201B}'"
        );
        // Double quotes, `$` and backticks are plain characters in a single-quoted literal.
        assert_eq!(quote("\"$x`\u{201C}"), "'\"$x`\u{201C}'");
        let script =
            change_registry_key(&change(RegistryValueType::REG_SZ, "x'; exit 0; '")).unwrap();
        assert!(
            script.contains("$name = 'Setting''; Remove-Item C:\\ -Recurse; '''"),
            "{script}"
        );
        assert!(script.contains("-Value 'x''; exit 0; '''"), "{script}");
        parses(&script);
    }

    #[test]
    fn script_files_carry_a_utf8_byte_order_mark() {
        let bytes = script_file("Write-Host 'Grüße'");
        assert_eq!(&bytes[..3], [0xEF, 0xBB, 0xBF]);
        assert_eq!(
            std::str::from_utf8(&bytes[3..]).unwrap(),
            "Write-Host 'Grüße'"
        );
    }

    #[test]
    fn every_registry_type_generates_parseable_powershell() {
        for (value_type, data, expect) in [
            (
                RegistryValueType::REG_SZ,
                "hello",
                "-PropertyType String -Value 'hello'",
            ),
            (
                RegistryValueType::REG_EXPAND_SZ,
                "%TEMP%\\x",
                "-PropertyType ExpandString",
            ),
            (
                RegistryValueType::REG_MULTI_SZ,
                "a\nb",
                "[string[]]@('a', 'b')",
            ),
            (
                RegistryValueType::REG_DWORD,
                "4294967295",
                "([uint32]4294967295)",
            ),
            (
                RegistryValueType::REG_QWORD,
                "18446744073709551615",
                "([uint64]18446744073709551615)",
            ),
            (
                RegistryValueType::REG_BINARY,
                "258",
                "([byte[]]@(0x02, 0x01))",
            ),
            (RegistryValueType::REG_BINARY, "0", "([byte[]]@(0x00))"),
        ] {
            let script = change_registry_key(&change(value_type, data)).unwrap();
            assert!(
                script.contains(expect),
                "{value_type:?}: {expect} not in\n{script}"
            );
            parses(&script);
        }
    }

    #[test]
    fn numeric_types_refuse_what_does_not_fit() {
        assert!(change_registry_key(&change(RegistryValueType::REG_DWORD, "4294967296")).is_err());
        assert!(change_registry_key(&change(RegistryValueType::REG_QWORD, "abc")).is_err());
    }

    #[test]
    fn uninstall_scripts_parse_with_and_without_a_version() {
        for version in [Some("8.5".to_string()), None] {
            let script = uninstall_software(&UninstallSoftware {
                uninstall_key: r"HKEY_LOCAL_MACHINE\SOFTWARE\Microsoft\Windows\CurrentVersion\Uninstall\{1E0D5689-40F1-4E46-ABBB-EAAC68B5CD89}".into(),
                display_name: "Notepad++ (64-bit x64)".into(),
                display_version: version.clone(),
                version_match: VersionMatch::Equals,
            });
            parses(&script);
            assert_eq!(
                script.contains("$displayVersion = '8.5'"),
                version.is_some()
            );
        }
    }
}
