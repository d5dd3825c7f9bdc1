//! Windows Update through the Windows Update Agent COM API, as generated PowerShell:
//! search for applicable software updates, keep those the plan selects, download,
//! install, and print one JSON result line the agent parses.

use std::time::Duration;

use serde::Deserialize;

use crate::agent::powershell::quote_list;
use crate::api::patchjob::{PatchOutcome, PatchResults};
use crate::api::plan::{PatchClassification, PatchFailWhen, PatchSelection};

use super::{Applying, PatchError, Patcher, run, summary};

/// Marks the result line among everything else the script prints.
pub const RESULT_PREFIX: &str = "FLEETPATCH-RESULT ";

#[derive(Clone, Copy, Debug, Default)]
pub struct WindowsUpdate;

/// Windows Update classification categories, by `CategoryID`. Category *names* are
/// localised ("Sicherheitsupdates" on German Windows); the IDs are the same everywhere.
pub const SECURITY_UPDATES: &str = "0fa1201d-4330-4fa8-8ae9-b877473b6441";
pub const CRITICAL_UPDATES: &str = "e6cf1350-c01b-414d-a61f-263d14d133b4";
pub const UPDATES: &str = "cd5ffd1e-e932-4e3a-bf74-18bf0b1bbd83";
pub const UPDATE_ROLLUPS: &str = "28bc880e-0592-4cbf-8f95-c79b17911d5f";

/// The classification category IDs for the plan's classifications; empty means all.
pub fn categories(selection: &PatchSelection) -> Vec<&'static str> {
    if selection
        .classifications
        .iter()
        .any(|c| matches!(c, PatchClassification::All))
    {
        return Vec::new();
    }
    let mut ids = Vec::new();
    for classification in &selection.classifications {
        match classification {
            PatchClassification::Security => ids.push(SECURITY_UPDATES),
            PatchClassification::Critical => ids.push(CRITICAL_UPDATES),
            PatchClassification::Bugfix => ids.extend([UPDATES, UPDATE_ROLLUPS]),
            PatchClassification::All => unreachable!("handled above"),
        }
    }
    ids
}

/// The script that searches, filters, downloads and installs updates. It prints one
/// result line even when the Windows Update API fails, with the error and its HRESULT.
pub fn script(selection: &PatchSelection) -> String {
    format!(
        r#"$ErrorActionPreference = 'Stop'
$ProgressPreference = 'SilentlyContinue'
$categories = {categories}
$include = {include}
$exclude = {exclude}
$installed = @()
$failed = @()
$reboot = $false
$errorText = $null
$hresult = $null
function Get-Entry($update, $result, $stage) {{
  @{{ name = $update.Title; code = $result.ResultCode; hresult = $result.HResult; stage = $stage }}
}}
try {{
  $session = New-Object -ComObject 'Microsoft.Update.Session'
  $session.ClientApplicationID = 'fleetpatch'
  $searcher = $session.CreateUpdateSearcher()
  $found = $searcher.Search("IsInstalled=0 and IsHidden=0 and Type='Software'")
  $selected = New-Object -ComObject 'Microsoft.Update.UpdateColl'
  foreach ($update in $found.Updates) {{
    $kbs = @($update.KBArticleIDs | ForEach-Object {{ "KB$_" }})
    $names = @($update.Title) + $kbs
    if (@($names | Where-Object {{ $exclude -contains $_ }}).Count -gt 0) {{ continue }}
    $ids = @($update.Categories | ForEach-Object {{ $_.CategoryID }})
    $inCategory = $categories.Count -eq 0 -or @($ids | Where-Object {{ $categories -contains $_ }}).Count -gt 0
    $included = @($names | Where-Object {{ $include -contains $_ }}).Count -gt 0
    # Optional updates (previews, feature updates for seekers) only when named in include.
    if ($update.BrowseOnly -and -not $included) {{ continue }}
    if ($inCategory -or $included) {{
      if (-not $update.EulaAccepted) {{ $update.AcceptEula() }}
      [void]$selected.Add($update)
    }}
  }}
  if ($selected.Count -gt 0) {{
    $downloader = $session.CreateUpdateDownloader()
    $downloader.Updates = $selected
    $download = $downloader.Download()
    $ready = New-Object -ComObject 'Microsoft.Update.UpdateColl'
    for ($i = 0; $i -lt $selected.Count; $i++) {{
      $result = $download.GetUpdateResult($i)
      # OperationResultCode: 2 succeeded, 3 succeeded with errors.
      if (($result.ResultCode -eq 2 -or $result.ResultCode -eq 3) -and $selected.Item($i).IsDownloaded) {{
        [void]$ready.Add($selected.Item($i))
      }} else {{
        $failed += Get-Entry $selected.Item($i) $result 'download'
      }}
    }}
    if ($ready.Count -gt 0) {{
      $installer = $session.CreateUpdateInstaller()
      $installer.Updates = $ready
      $install = $installer.Install()
      $reboot = $install.RebootRequired
      for ($i = 0; $i -lt $ready.Count; $i++) {{
        $entry = Get-Entry $ready.Item($i) $install.GetUpdateResult($i) 'install'
        if ($entry.code -eq 2 -or $entry.code -eq 3) {{ $installed += $entry }} else {{ $failed += $entry }}
      }}
    }}
  }}
}} catch {{
  $errorText = $_.Exception.Message
  $hresult = $_.Exception.HResult
}}
$summary = @{{ installed = $installed; failed = $failed; rebootRequired = $reboot; error = $errorText; hresult = $hresult }}
Write-Output ('{prefix}' + ($summary | ConvertTo-Json -Compress -Depth 4))
if ($null -ne $errorText -or $failed.Count -gt 0) {{ exit 1 }}
exit 0
"#,
        categories = quote_list(categories(selection)),
        include = quote_list(&selection.include),
        exclude = quote_list(&selection.exclude),
        prefix = RESULT_PREFIX,
    )
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ScriptResult {
    #[serde(default, deserialize_with = "one_or_many")]
    installed: Vec<Entry>,
    #[serde(default, deserialize_with = "one_or_many")]
    failed: Vec<Entry>,
    #[serde(default)]
    reboot_required: bool,
    /// The Windows Update API's error, when a call failed.
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    hresult: Option<i64>,
}

#[derive(Deserialize)]
struct Entry {
    name: String,
    code: i32,
    #[serde(default)]
    hresult: Option<i64>,
    /// `download` or `install`.
    #[serde(default)]
    stage: Option<String>,
}

/// An HRESULT as Windows shows it: `0x8024402C`.
fn hresult(value: i64) -> String {
    // HRESULTs are 32 bits; PowerShell prints them as signed numbers.
    format!("0x{:08X}", value as u32)
}

/// ConvertTo-Json writes a one-element array as a bare object.
fn one_or_many<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<Entry>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(Entry),
        Many(Vec<Entry>),
        Null(()),
    }
    Ok(match OneOrMany::deserialize(deserializer)? {
        OneOrMany::One(entry) => vec![entry],
        OneOrMany::Many(entries) => entries,
        OneOrMany::Null(()) => Vec::new(),
    })
}

/// Reads the script's result line.
/// The step's phase follows `fail_when` ([`super::verdict`]); an error of the Windows
/// Update API counts as a failure of the updates it kept from being tried.
pub fn parse_output(output: &str, fail_when: PatchFailWhen) -> Result<PatchResults, String> {
    let line = output
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix(RESULT_PREFIX))
        .ok_or_else(|| "the Windows Update script printed no result".to_string())?;
    let parsed: ScriptResult =
        serde_json::from_str(line).map_err(|e| format!("unreadable Windows Update result: {e}"))?;
    let api_error = parsed.error.as_ref().map(|error| match parsed.hresult {
        Some(code) => format!("Windows Update failed: {error} (HRESULT {})", hresult(code)),
        None => format!("Windows Update failed: {error}"),
    });
    if let Some(error) = &api_error
        && parsed.installed.is_empty()
        && parsed.failed.is_empty()
    {
        return Err(error.clone());
    }
    let outcome = |e: Entry, failed: bool| PatchOutcome {
        name: e.name,
        version: None,
        message: failed.then(|| {
            let stage = e.stage.as_deref().unwrap_or("install");
            match e.hresult.filter(|code| *code != 0) {
                Some(code) => format!(
                    "Windows Update {stage} result code {} (HRESULT {})",
                    e.code,
                    hresult(code)
                ),
                None => format!("Windows Update {stage} result code {}", e.code),
            }
        }),
    };
    let failed = parsed.failed.len() + usize::from(api_error.is_some());
    let mut results = PatchResults {
        phase: super::verdict(parsed.installed.len(), failed, fail_when),
        patcher: Some("windows-update".into()),
        installed: parsed
            .installed
            .into_iter()
            .map(|e| outcome(e, false))
            .collect(),
        failed: parsed
            .failed
            .into_iter()
            .map(|e| outcome(e, true))
            .collect(),
        reboot_required: parsed.reboot_required,
        message: String::new(),
    };
    results.message = summary(&results);
    if let Some(error) = api_error {
        results.message = format!("{}; {error}", results.message);
    }
    Ok(results)
}

impl Patcher for WindowsUpdate {
    fn name(&self) -> &'static str {
        "windows-update"
    }

    fn apply<'a>(&'a self, selection: &'a PatchSelection, timeout: Duration) -> Applying<'a> {
        Box::pin(async move {
            if !cfg!(windows) {
                return Err(PatchError::Unsupported(
                    "Windows Update needs Windows".into(),
                ));
            }
            // A directory of its own with an unguessable name, closed to everyone but
            // SYSTEM and Administrators before the script is written into it: the shared
            // temporary directory is writable by every local user.
            let work_dir = std::env::temp_dir().join(format!(
                "fleetpatch-windows-update-{}",
                uuid::Uuid::new_v4()
            ));
            let unsupported = |e: &dyn std::fmt::Display| PatchError::Unsupported(e.to_string());
            std::fs::create_dir(&work_dir).map_err(|e| unsupported(&e))?;
            let outcome = async {
                crate::agent::process::protect_state_dir(&work_dir).map_err(|e| unsupported(&e))?;
                let spec = crate::agent::script::powershell_inline(
                    &script(selection),
                    "windows-update",
                    &work_dir,
                    timeout,
                )
                .map_err(|e| unsupported(&e))?;
                run(&spec, &[0, 1]).await
            }
            .await;
            let _ = std::fs::remove_dir_all(&work_dir);
            let outcome = outcome?;
            parse_output(&outcome.stdout, selection.fail_when).map_err(|message| {
                PatchError::Command {
                    command: "windows-update".into(),
                    message: if outcome.output_tail.is_empty() {
                        message
                    } else {
                        format!("{message}\n{}", outcome.output_tail)
                    },
                }
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ScriptLanguage;
    use crate::api::patchjob::ActionPhase;
    use crate::api::syntax;

    #[test]
    fn the_generated_script_parses_for_every_selection() {
        for classifications in [
            vec![PatchClassification::Security, PatchClassification::Critical],
            vec![PatchClassification::All],
            vec![PatchClassification::Bugfix],
        ] {
            let selection = PatchSelection {
                classifications,
                include: vec!["KB5034441".into()],
                exclude: vec!["KB890830".into(), "it's".into()],
                skip: false,
                fail_when: Default::default(),
            };
            let script = script(&selection);
            let diagnostics = syntax::check(ScriptLanguage::PowerShell, &script);
            assert!(
                diagnostics.is_empty(),
                "{}\n{script}",
                syntax::describe(&diagnostics)
            );
            assert!(script.contains("$exclude = @('KB890830', 'it''s')"));
        }
    }

    #[test]
    fn categories_are_locale_independent_ids() {
        let selection = PatchSelection::default();
        assert_eq!(categories(&selection), [SECURITY_UPDATES, CRITICAL_UPDATES]);
        let bugfix = PatchSelection {
            classifications: vec![PatchClassification::Bugfix],
            ..PatchSelection::default()
        };
        assert_eq!(categories(&bugfix), [UPDATES, UPDATE_ROLLUPS]);
        let script = script(&selection);
        assert!(script.contains("$_.CategoryID"), "{script}");
        assert!(!script.contains("Security Updates"), "{script}");
    }

    #[test]
    fn api_errors_and_download_failures_are_reported() {
        let output = "FLEETPATCH-RESULT {\"installed\":[],\"failed\":[],\"rebootRequired\":false,\"error\":\"Exception from HRESULT: 0x8024402C\",\"hresult\":-2145107924}";
        let err = parse_output(output, PatchFailWhen::AllFailed).unwrap_err();
        assert_eq!(
            err,
            "Windows Update failed: Exception from HRESULT: 0x8024402C (HRESULT 0x8024402C)"
        );
        let output = "FLEETPATCH-RESULT {\"installed\":{\"name\":\"A\",\"code\":2,\"hresult\":0,\"stage\":\"install\"},\"failed\":{\"name\":\"B\",\"code\":4,\"hresult\":-2145124329,\"stage\":\"download\"},\"rebootRequired\":false,\"error\":null,\"hresult\":null}";
        let results = parse_output(output, PatchFailWhen::AnyFailed).unwrap();
        assert_eq!(results.phase, ActionPhase::Failed);
        assert_eq!(
            parse_output(output, PatchFailWhen::AllFailed)
                .unwrap()
                .phase,
            ActionPhase::Succeeded,
            "one of two installed: patching did not fail (JetPatch)"
        );
        assert_eq!(results.installed[0].message, None);
        assert_eq!(
            results.failed[0].message.as_deref(),
            Some("Windows Update download result code 4 (HRESULT 0x80240017)")
        );
    }

    #[test]
    fn result_lines_with_one_or_many_entries() {
        let output = "Searching...\nFLEETPATCH-RESULT {\"installed\":{\"name\":\"2024-06 Cumulative Update (KB5039212)\",\"code\":2},\"failed\":[],\"rebootRequired\":true}\n";
        let results = parse_output(output, PatchFailWhen::AllFailed).unwrap();
        assert_eq!(results.installed.len(), 1);
        assert!(results.reboot_required);
        assert_eq!(results.phase, ActionPhase::Succeeded);
        let output = "FLEETPATCH-RESULT {\"installed\":[],\"failed\":[{\"name\":\"A\",\"code\":4},{\"name\":\"B\",\"code\":5}],\"rebootRequired\":false}";
        let results = parse_output(output, PatchFailWhen::AllFailed).unwrap();
        assert_eq!(results.failed.len(), 2);
        assert_eq!(results.phase, ActionPhase::Failed);
        assert!(parse_output("nothing here", PatchFailWhen::AllFailed).is_err());
    }
}
