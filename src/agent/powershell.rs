//! PowerShell the agent generates (registry changes, msiexec uninstalls, the Windows
//! Update patcher) and how PowerShell code reaches `powershell.exe`. Every value from a
//! manifest enters generated code through [`quote`], as one single-quoted literal and
//! never as code; script files are UTF-8 with a byte order mark; generated code starts
//! through `-EncodedCommand`, where no execution policy applies.

use std::path::PathBuf;

use base64::Engine;

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

/// `text` with every line ending CRLF.
pub fn crlf(text: &str) -> String {
    text.replace("\r\n", "\n").replace('\n', "\r\n")
}

/// The file of a signed script: its code, a line break unless the code ends with one,
/// then the signature block, all with CRLF line endings. Authenticode signs the text as
/// it was on Windows; YAML turns CRLF into LF on the way, which would fail verification.
pub fn signed_script(content: &str, signature: &str) -> String {
    let mut text = String::with_capacity(content.len() + signature.len() + 2);
    text.push_str(content);
    if !content.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(signature);
    crlf(&text)
}

/// The line that opens an Authenticode signature block at the end of a PowerShell script.
pub const SIGNATURE_BLOCK_START: &str = "# SIG # Begin signature block";

/// The text of the `.ps1` file for a Script's `content` and its `signature`. A signed
/// script, whether its signature block comes in `signature` or is already at the end of
/// `content` (pasted from a signed file), gets CRLF line endings, as it had when it was
/// signed; anything else is written as it is.
pub fn script_text(content: &str, signature: Option<&str>) -> String {
    match signature {
        Some(signature) => signed_script(content, signature),
        None if content.contains(SIGNATURE_BLOCK_START) => crlf(content),
        None => content.to_string(),
    }
}

/// Windows PowerShell by its absolute path under `%SystemRoot%` (`C:\Windows` when the
/// variable is missing), so no `powershell.exe` earlier on `PATH` is run instead.
pub fn powershell_exe(system_root: Option<&str>) -> PathBuf {
    let root = system_root
        .filter(|root| !root.is_empty())
        .unwrap_or(r"C:\Windows")
        .trim_end_matches('\\');
    PathBuf::from(format!(
        r"{root}\System32\WindowsPowerShell\v1.0\powershell.exe"
    ))
}

/// `code` as `-EncodedCommand` takes it: base64 of its UTF-16LE bytes.
pub fn encode_command(code: &str) -> String {
    let bytes: Vec<u8> = code.encode_utf16().flat_map(u16::to_le_bytes).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The command that runs the generated script stored at `script_path`. It is passed
/// with `-EncodedCommand` (a command, which no execution policy covers, not a script
/// file, which AllSigned would refuse); it reads the script and runs it as a script
/// block, so the command line stays short however long the script is (`-EncodedCommand`
/// alone would need 2.7 characters of command line per character of script, and a
/// 16384-character registry value does not fit in Windows' 32767). It also switches the
/// console to UTF-8, which the agent decodes, instead of the OEM code page.
pub fn generated_script_loader(script_path: &str) -> String {
    format!(
        r#"$ErrorActionPreference = 'Stop'
try {{ [Console]::OutputEncoding = New-Object System.Text.UTF8Encoding $false }} catch {{ }}
$path = {path}
try {{
  $block = [scriptblock]::Create((Get-Content -LiteralPath $path -Raw -Encoding UTF8))
}} catch {{
  Write-Host "cannot load the generated script $path : $($_.Exception.Message)"
  exit 1
}}
try {{
  & $block
}} catch {{
  Write-Host "the generated script $path failed: $($_.Exception.Message)"
  exit 1
}}
exit 0
"#,
        path = quote(script_path),
    )
}

/// Program and arguments that run the generated script at `script_path`.
pub fn generated_script_command(
    script_path: &str,
    system_root: Option<&str>,
) -> (PathBuf, Vec<String>) {
    (
        powershell_exe(system_root),
        vec![
            "-NoLogo".into(),
            "-NoProfile".into(),
            "-NonInteractive".into(),
            "-EncodedCommand".into(),
            encode_command(&generated_script_loader(script_path)),
        ],
    )
}

/// The registry provider's name for a key's default (unnamed) value; `-Name ''` does
/// not bind.
pub const DEFAULT_VALUE_NAME: &str = "(default)";

/// Registry provider path for a key path like `HKEY_LOCAL_MACHINE\SOFTWARE\Vendor`.
fn provider_path(key_path: &str) -> String {
    quote(&format!("Registry::{key_path}"))
}

/// REG_BINARY data: hexadecimal byte pairs, `01ff` for the bytes 0x01 and 0xff.
pub fn binary_data(data: &str) -> Result<Vec<u8>, String> {
    hex::decode(data).map_err(|_| {
        format!("REG_BINARY data must be hexadecimal byte pairs like 01ff, got {data:?}")
    })
}

/// `New-ItemProperty -PropertyType` and the value expression for registry data. Every
/// expression is a string literal or parenthesised: in argument mode a bare `[` starts
/// a word, so `-Value [string[]]@(...)` would bind a string, not an array.
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
            let lines = data.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
            ("MultiString", format!("([string[]]{})", quote_list(lines)))
        }
        RegistryValueType::REG_DWORD => {
            let value = u32::try_from(number()?)
                .map_err(|_| format!("{data} does not fit in a REG_DWORD"))?;
            ("DWord", format!("([uint32]{value})"))
        }
        RegistryValueType::REG_QWORD => ("QWord", format!("([uint64]{})", number()?)),
        RegistryValueType::REG_BINARY => {
            let list: Vec<String> = binary_data(data)?
                .iter()
                .map(|b| format!("0x{b:02x}"))
                .collect();
            ("Binary", format!("([byte[]]@({}))", list.join(", ")))
        }
    })
}

const PRELUDE: &str = "$ErrorActionPreference = 'Stop'\n$ProgressPreference = 'SilentlyContinue'\n";

/// Whether `key_path` is under HKEY_CURRENT_USER, which for the agent (running as
/// SYSTEM) is SYSTEM's own hive, HKEY_USERS\S-1-5-18, not a signed-in user's.
fn is_current_user(key_path: &str) -> bool {
    let root = key_path.split('\\').next().unwrap_or_default();
    root.eq_ignore_ascii_case("HKEY_CURRENT_USER")
}

/// Script that sets one registry value. Exit 0 when set (or when the key is missing and
/// may not be created), 1 on error.
pub fn change_registry_key(change: &ChangeRegistryKey) -> Result<String, String> {
    let (property_type, value) = property_value(change.value_type, &change.value_data)?;
    let create = if change.create_if_missing {
        "$true"
    } else {
        "$false"
    };
    let name = if change.value_name.is_empty() {
        DEFAULT_VALUE_NAME
    } else {
        change.value_name.as_str()
    };
    let note = if is_current_user(&change.key_path) {
        "Write-Host 'note: HKEY_CURRENT_USER is the hive of the account the agent runs as (SYSTEM: HKEY_USERS\\S-1-5-18), not that of a signed-in user'\n"
    } else {
        ""
    };
    Ok(format!(
        r#"{PRELUDE}{note}$path = {path}
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
        name = quote(name),
        value_type = change.value_type.as_str(),
    ))
}

/// The uninstall keys to look in: `key` itself, then the same key in the other registry
/// view (`HKEY_LOCAL_MACHINE\SOFTWARE\...` for 64-bit programs,
/// `HKEY_LOCAL_MACHINE\SOFTWARE\WOW6432Node\...` for 32-bit ones).
pub fn uninstall_key_candidates(key: &str) -> Vec<String> {
    const MACHINE_SOFTWARE: &str = "hkey_local_machine\\software\\";
    const WOW: &str = "wow6432node\\";
    let lower = key.to_ascii_lowercase();
    let mut keys = vec![key.to_string()];
    if let Some(rest) = lower.strip_prefix(MACHINE_SOFTWARE) {
        let at = MACHINE_SOFTWARE.len();
        if rest.starts_with(WOW) {
            keys.push(format!("{}{}", &key[..at], &key[at + WOW.len()..]));
        } else {
            keys.push(format!("{}WOW6432Node\\{}", &key[..at], &key[at..]));
        }
    }
    keys
}

/// Exit code of generated code meaning "nothing to do here": the action is Skipped.
pub const NOT_APPLICABLE_EXIT: i32 = 9;

/// Script that uninstalls a Windows Installer product. Exit 0 when removed,
/// [`NOT_APPLICABLE_EXIT`] when nothing matched (reported Skipped), 10 when removed and
/// a reboot is needed, 1 when it cannot be removed or is still there afterwards.
pub fn uninstall_software(uninstall: &UninstallSoftware) -> String {
    let version = uninstall
        .display_version
        .as_deref()
        .map(quote)
        .unwrap_or_else(|| "$null".into());
    let keys: Vec<String> = uninstall_key_candidates(&uninstall.uninstall_key)
        .iter()
        .map(|key| format!("Registry::{key}"))
        .collect();
    format!(
        r#"{PRELUDE}$keys = {keys}
$displayName = {name}
$displayVersion = {version}
$key = $null
foreach ($candidate in $keys) {{
  if (Test-Path -LiteralPath $candidate) {{ $key = $candidate; break }}
}}
if ($null -eq $key) {{
  Write-Host "skipped: nothing to uninstall, none of these keys exists: $($keys -join ', ')"
  exit {NOT_APPLICABLE_EXIT}
}}
$entry = Get-ItemProperty -LiteralPath $key
if ($entry.DisplayName -ne $displayName) {{
  Write-Host "skipped: nothing to uninstall, DisplayName under $key is '$($entry.DisplayName)', not '$displayName'"
  exit {NOT_APPLICABLE_EXIT}
}}
if ($null -ne $displayVersion) {{
  # The value named Version, as Qualys compares it, else DisplayVersion. Registry value
  # names are case-insensitive, and so is GetValue; the version string must be exact.
  $item = Get-Item -LiteralPath $key
  $versionValue = 'Version'
  $installedVersion = $item.GetValue('Version')
  if ($null -eq $installedVersion) {{
    $versionValue = 'DisplayVersion'
    $installedVersion = $item.GetValue('DisplayVersion')
  }} elseif ($item.GetValueKind('Version') -eq [Microsoft.Win32.RegistryValueKind]::DWord) {{
    # Windows Installer writes Version as a DWORD: major (8 bits), minor (8), build (16).
    $packed = [int64]$installedVersion -band 0xFFFFFFFF
    $installedVersion = '{{0}}.{{1}}.{{2}}' -f (($packed -shr 24) -band 0xFF), (($packed -shr 16) -band 0xFF), ($packed -band 0xFFFF)
  }}
  if (-not [string]::Equals([string]$installedVersion, $displayVersion, [System.StringComparison]::Ordinal)) {{
    Write-Host "skipped: left installed, $versionValue under $key is '$installedVersion', not '$displayVersion'"
    exit {NOT_APPLICABLE_EXIT}
  }}
}}
# A Windows Installer product: its key is the product code and says WindowsInstaller=1,
# or its UninstallString calls msiexec with the product code. Anything else (a Burn
# bundle, an NSIS or Inno setup) is not removed by msiexec, whatever its key looks like.
$productCode = $null
$leaf = Split-Path -Leaf $key
if ($entry.WindowsInstaller -eq 1 -and $leaf -match '^\{{[0-9A-Fa-f-]{{36}}\}}$') {{
  $productCode = $leaf
}} elseif ("$($entry.UninstallString)" -match '(?i)msiexec(\.exe)?"?\s+(.*\s)?/[xi]\s*"?(?<code>\{{[0-9a-f-]{{36}}\}})') {{
  $productCode = $Matches['code']
}}
if ($null -eq $productCode) {{
  Write-Host "cannot uninstall '$displayName': it is not a Windows Installer product (UninstallString: $($entry.UninstallString)); remove it with a RunScript task"
  exit 1
}}
$msiexec = Join-Path $env:SystemRoot 'System32\msiexec.exe'
Write-Host "uninstalling $displayName $($entry.DisplayVersion) ($productCode)"
$process = Start-Process -FilePath $msiexec -ArgumentList @('/x', $productCode, '/qn', '/norestart') -Wait -PassThru
$code = $process.ExitCode
$reboot = $false
switch ($code) {{
  0 {{ }}
  1641 {{ $reboot = $true }}
  3010 {{ $reboot = $true }}
  1605 {{ Write-Host "msiexec does not know $productCode although its uninstall key exists: nothing was removed"; exit 1 }}
  1618 {{ Write-Host 'msiexec: another installation is in progress; nothing was removed'; exit 1 }}
  default {{ Write-Host "msiexec failed with exit code $code"; exit 1 }}
}}
if (Test-Path -LiteralPath $key) {{
  Write-Host "msiexec exited $code but $key is still there: $displayName is still installed"
  exit 1
}}
if ($reboot) {{ Write-Host "uninstalled; msiexec exit code $code: a reboot is needed"; exit 10 }}
Write-Host 'uninstalled'
exit 0
"#,
        keys = quote_list(&keys),
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

    /// `createIfMissing: false` never creates the key: the only `New-Item` sits after a
    /// guard that ends the script when the key is missing and creating is not allowed.
    #[test]
    fn a_missing_key_is_created_only_when_allowed() {
        let script = |create: bool| {
            change_registry_key(&ChangeRegistryKey {
                create_if_missing: create,
                ..change(RegistryValueType::REG_SZ, "x")
            })
            .unwrap()
        };
        let refused = script(false);
        assert!(refused.contains("$createIfMissing = $false\n"), "{refused}");
        assert!(script(true).contains("$createIfMissing = $true\n"));
        let guard = refused
            .find("if (-not $createIfMissing) {")
            .expect("the guard");
        let create = refused.find("New-Item ").expect("the creation");
        assert_eq!(refused.matches("New-Item ").count(), 1);
        let guarded = &refused[guard..create];
        assert!(
            guarded.contains("nothing changed") && guarded.contains("exit 0\n    }"),
            "the guard ends the script before New-Item: {guarded}"
        );
        let missing = refused
            .find("if (-not (Test-Path -LiteralPath $path)) {")
            .expect("the existence check");
        assert!(missing < guard, "the guard applies only to a missing key");
    }

    #[test]
    fn signed_scripts_get_crlf_and_exactly_one_line_break_before_the_signature() {
        let signature = "# SIG # Begin signature block\n# MIIb\n# SIG # End signature block\n";
        let expected = "Write-Host hi\r\nexit 0\r\n# SIG # Begin signature block\r\n# MIIb\r\n# SIG # End signature block\r\n";
        assert_eq!(
            signed_script("Write-Host hi\nexit 0\n", signature),
            expected
        );
        assert_eq!(signed_script("Write-Host hi\nexit 0", signature), expected);
        assert_eq!(
            signed_script("Write-Host hi\r\nexit 0\r\n", signature),
            expected
        );
    }

    #[test]
    fn a_signature_block_inside_the_content_also_gets_crlf() {
        // YAML block scalars carry LF only; Authenticode hashed the CRLF text.
        let pasted =
            "Write-Host hi\n# SIG # Begin signature block\n# MIIb\n# SIG # End signature block\n";
        assert_eq!(
            script_text(pasted, None),
            "Write-Host hi\r\n# SIG # Begin signature block\r\n# MIIb\r\n# SIG # End signature block\r\n"
        );
        assert_eq!(
            script_text("Write-Host hi\n", Some("# SIG # Begin signature block\n")),
            "Write-Host hi\r\n# SIG # Begin signature block\r\n"
        );
        // Unsigned scripts are written as they are.
        assert_eq!(script_text("Write-Host hi\n", None), "Write-Host hi\n");
    }

    #[test]
    fn powershell_is_called_by_its_absolute_path() {
        assert_eq!(
            powershell_exe(Some(r"D:\WINDOWS\")),
            PathBuf::from(r"D:\WINDOWS\System32\WindowsPowerShell\v1.0\powershell.exe")
        );
        assert_eq!(
            powershell_exe(None),
            PathBuf::from(r"C:\Windows\System32\WindowsPowerShell\v1.0\powershell.exe")
        );
    }

    #[test]
    fn generated_code_runs_as_an_encoded_command_not_as_a_script_file() {
        let (program, args) = generated_script_command(r"C:\state\work\job\pre-0.ps1", None);
        assert_eq!(program, powershell_exe(None));
        assert_eq!(
            args[..4],
            [
                "-NoLogo",
                "-NoProfile",
                "-NonInteractive",
                "-EncodedCommand"
            ]
        );
        assert!(!args.iter().any(|a| a.eq_ignore_ascii_case("-File")));
        assert!(
            !args
                .iter()
                .any(|a| a.eq_ignore_ascii_case("-ExecutionPolicy"))
        );
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(&args[4])
            .unwrap();
        let units: Vec<u16> = decoded
            .chunks(2)
            .map(|pair| u16::from_le_bytes([pair[0], pair[1]]))
            .collect();
        let loader = String::from_utf16(&units).unwrap();
        assert_eq!(
            loader,
            generated_script_loader(r"C:\state\work\job\pre-0.ps1")
        );
        assert!(loader.contains(r"$path = 'C:\state\work\job\pre-0.ps1'"));
        assert!(loader.contains("[Console]::OutputEncoding"));
        parses(&loader);
        // Short, whatever the script: far below Windows' 32767-character command line.
        assert!(args[4].len() < 2000, "{}", args[4].len());
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
                "a\r\nb",
                "-Value ([string[]]@('a', 'b'))",
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
                "0100ff",
                "-Value ([byte[]]@(0x01, 0x00, 0xff))",
            ),
            (RegistryValueType::REG_BINARY, "", "([byte[]]@())"),
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
        for bad in ["258", "0x01", "de ad", "zz"] {
            let err = change_registry_key(&change(RegistryValueType::REG_BINARY, bad)).unwrap_err();
            assert!(err.contains("hexadecimal byte pairs"), "{bad}: {err}");
        }
    }

    #[test]
    fn the_default_value_is_named_default() {
        let mut default = change(RegistryValueType::REG_SZ, "x");
        default.value_name = String::new();
        let script = change_registry_key(&default).unwrap();
        assert!(script.contains("$name = '(default)'"), "{script}");
        parses(&script);
    }

    #[test]
    fn current_user_keys_say_whose_hive_they_are() {
        let mut hkcu = change(RegistryValueType::REG_SZ, "x");
        hkcu.key_path = r"HKEY_CURRENT_USER\Software\Vendor".into();
        let script = change_registry_key(&hkcu).unwrap();
        assert!(script.contains(r"HKEY_USERS\S-1-5-18"), "{script}");
        parses(&script);
        let machine = change_registry_key(&change(RegistryValueType::REG_SZ, "x")).unwrap();
        assert!(!machine.contains("S-1-5-18"));
    }

    #[test]
    fn uninstall_keys_are_searched_in_both_registry_views() {
        let native = r"HKEY_LOCAL_MACHINE\SOFTWARE\Microsoft\Windows\CurrentVersion\Uninstall\{1E0D5689-40F1-4E46-ABBB-EAAC68B5CD89}";
        let wow = r"HKEY_LOCAL_MACHINE\SOFTWARE\WOW6432Node\Microsoft\Windows\CurrentVersion\Uninstall\{1E0D5689-40F1-4E46-ABBB-EAAC68B5CD89}";
        assert_eq!(uninstall_key_candidates(native), [native, wow]);
        assert_eq!(uninstall_key_candidates(wow), [wow, native]);
        let lower = r"hkey_local_machine\software\wow6432node\X";
        assert_eq!(
            uninstall_key_candidates(lower),
            [lower, r"hkey_local_machine\software\X"]
        );
        let user = r"HKEY_CURRENT_USER\Software\Microsoft\Windows\CurrentVersion\Uninstall\App";
        assert_eq!(uninstall_key_candidates(user), [user]);
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
            assert!(script.contains("WOW6432Node"), "{script}");
            // msiexec's "unknown product" is a failure, and so is a key that survives.
            assert!(script.contains("1605 { Write-Host"), "{script}");
            assert!(
                !script.contains("1605 { Write-Host 'msiexec: product is not installed'; exit 0 }")
            );
            assert!(script.contains("$entry.WindowsInstaller -eq 1"), "{script}");
        }
    }
}
