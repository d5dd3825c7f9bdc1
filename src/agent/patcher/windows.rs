//! Windows Update through the Windows Update Agent COM API, as generated PowerShell:
//! search for applicable software updates, keep those the plan selects, download,
//! install, and print one JSON result line the agent parses.

use std::time::Duration;

use futures::future::BoxFuture;
use serde::Deserialize;

use crate::agent::powershell::quote_list;
use crate::api::patchjob::{ActionPhase, PatchOutcome, PatchResults};
use crate::api::plan::{PatchClassification, PatchSelection};

use super::{PatchError, Patcher, run, summary};

/// Marks the result line among everything else the script prints.
pub const RESULT_PREFIX: &str = "FLEETPATCH-RESULT ";

#[derive(Clone, Copy, Debug, Default)]
pub struct WindowsUpdate;

/// Windows Update category names for the plan's classifications; empty means all.
fn categories(selection: &PatchSelection) -> Vec<&'static str> {
    if selection
        .classifications
        .iter()
        .any(|c| matches!(c, PatchClassification::All))
    {
        return Vec::new();
    }
    let mut names = Vec::new();
    for classification in &selection.classifications {
        names.push(match classification {
            PatchClassification::Security => "Security Updates",
            PatchClassification::Critical => "Critical Updates",
            PatchClassification::Bugfix => "Updates",
            PatchClassification::All => unreachable!("handled above"),
        });
    }
    names
}

/// The script that searches, filters, downloads and installs updates.
pub fn script(selection: &PatchSelection) -> String {
    format!(
        r#"$ErrorActionPreference = 'Stop'
$categories = {categories}
$include = {include}
$exclude = {exclude}
$session = New-Object -ComObject 'Microsoft.Update.Session'
$session.ClientApplicationID = 'fleetpatch'
$searcher = $session.CreateUpdateSearcher()
$found = $searcher.Search("IsInstalled=0 and IsHidden=0 and Type='Software'")
$selected = New-Object -ComObject 'Microsoft.Update.UpdateColl'
foreach ($update in $found.Updates) {{
  $kbs = @($update.KBArticleIDs | ForEach-Object {{ "KB$_" }})
  $names = @($update.Title) + $kbs
  if (@($names | Where-Object {{ $exclude -contains $_ }}).Count -gt 0) {{ continue }}
  $inCategory = $categories.Count -eq 0 -or @($update.Categories | Where-Object {{ $categories -contains $_.Name }}).Count -gt 0
  $included = @($names | Where-Object {{ $include -contains $_ }}).Count -gt 0
  if ($inCategory -or $included) {{
    if (-not $update.EulaAccepted) {{ $update.AcceptEula() }}
    [void]$selected.Add($update)
  }}
}}
$installed = @()
$failed = @()
$reboot = $false
if ($selected.Count -gt 0) {{
  $downloader = $session.CreateUpdateDownloader()
  $downloader.Updates = $selected
  [void]$downloader.Download()
  $installer = $session.CreateUpdateInstaller()
  $installer.Updates = $selected
  $result = $installer.Install()
  $reboot = $result.RebootRequired
  for ($i = 0; $i -lt $selected.Count; $i++) {{
    $entry = @{{ name = $selected.Item($i).Title; code = $result.GetUpdateResult($i).ResultCode }}
    # OperationResultCode: 2 succeeded, 3 succeeded with errors.
    if ($entry.code -eq 2 -or $entry.code -eq 3) {{ $installed += $entry }} else {{ $failed += $entry }}
  }}
}}
$summary = @{{ installed = $installed; failed = $failed; rebootRequired = $reboot }}
Write-Output ('{prefix}' + ($summary | ConvertTo-Json -Compress -Depth 4))
if ($failed.Count -gt 0) {{ exit 1 }}
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
}

#[derive(Deserialize)]
struct Entry {
    name: String,
    code: i32,
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
pub fn parse_output(output: &str) -> Result<PatchResults, String> {
    let line = output
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix(RESULT_PREFIX))
        .ok_or_else(|| "the Windows Update script printed no result".to_string())?;
    let parsed: ScriptResult =
        serde_json::from_str(line).map_err(|e| format!("unreadable Windows Update result: {e}"))?;
    let outcome = |e: Entry, failed: bool| PatchOutcome {
        name: e.name,
        version: None,
        message: failed.then(|| format!("Windows Update result code {}", e.code)),
    };
    let mut results = PatchResults {
        phase: if parsed.failed.is_empty() {
            ActionPhase::Succeeded
        } else {
            ActionPhase::Failed
        },
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
    Ok(results)
}

impl Patcher for WindowsUpdate {
    fn name(&self) -> &'static str {
        "windows-update"
    }

    fn apply<'a>(
        &'a self,
        selection: &'a PatchSelection,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<PatchResults, PatchError>> {
        Box::pin(async move {
            let work_dir = std::env::temp_dir().join("fleetpatch");
            let spec = crate::agent::script::powershell_inline(
                &script(selection),
                "windows-update",
                &work_dir,
                timeout,
            )
            .map_err(|e| PatchError::Unsupported(e.to_string()))?;
            let outcome = run(&spec, &[0, 1]).await?;
            parse_output(&outcome.stdout).map_err(|message| PatchError::Command {
                command: "windows-update".into(),
                message,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ScriptLanguage;
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
    fn categories_follow_the_classifications() {
        let selection = PatchSelection::default();
        assert_eq!(
            categories(&selection),
            ["Security Updates", "Critical Updates"]
        );
    }

    #[test]
    fn result_lines_with_one_or_many_entries() {
        let output = "Searching...\nFLEETPATCH-RESULT {\"installed\":{\"name\":\"2024-06 Cumulative Update (KB5039212)\",\"code\":2},\"failed\":[],\"rebootRequired\":true}\n";
        let results = parse_output(output).unwrap();
        assert_eq!(results.installed.len(), 1);
        assert!(results.reboot_required);
        assert_eq!(results.phase, ActionPhase::Succeeded);
        let output = "FLEETPATCH-RESULT {\"installed\":[],\"failed\":[{\"name\":\"A\",\"code\":4},{\"name\":\"B\",\"code\":5}],\"rebootRequired\":false}";
        let results = parse_output(output).unwrap();
        assert_eq!(results.failed.len(), 2);
        assert_eq!(results.phase, ActionPhase::Failed);
        assert!(parse_output("nothing here").is_err());
    }
}
