//! Running a resolved script: check its SHA-256, write it to the job's work directory,
//! and start the interpreter its language needs with the parameters as environment
//! variables. What PowerShell needs of the files and command lines is in
//! [`super::powershell`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::api::ScriptLanguage;
use crate::api::patchjob::ResolvedScript;
use crate::api::resolve::content_sha256;

use super::powershell;
use super::process::ProcessSpec;

#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    #[error("script {source_name} was refused: its SHA-256 is {actual}, the job says {expected}")]
    HashMismatch {
        source_name: String,
        expected: String,
        actual: String,
    },
    #[error(
        "parameter {name} is refused: it would replace the {name} environment variable every script gets"
    )]
    ReservedParameter { name: String },
    #[error("{language} scripts need Windows PowerShell; this host is not Windows")]
    RequiresWindows { language: &'static str },
    #[error("cannot write the script to {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How a script is to be started.
#[derive(Clone, Debug)]
pub struct ScriptRun<'a> {
    pub script: &'a ResolvedScript,
    /// File name stem in the work directory, e.g. `pre-0-install`.
    pub stem: String,
    pub env: BTreeMap<String, String>,
    pub bypass_execution_policy: bool,
    pub timeout: Duration,
}

/// Checks the script's hash, writes it under `work_dir` and returns the process to run.
pub fn prepare(run: &ScriptRun<'_>, work_dir: &Path) -> Result<ProcessSpec, ScriptError> {
    let script = run.script;
    let actual = content_sha256(&script.content);
    if !actual.eq_ignore_ascii_case(&script.sha256) {
        return Err(ScriptError::HashMismatch {
            source_name: script.source.to_string(),
            expected: script.sha256.clone(),
            actual,
        });
    }
    if let Some(name) = run.env.keys().find(|name| is_reserved_parameter(name)) {
        return Err(ScriptError::ReservedParameter { name: name.clone() });
    }
    let (extension, body) = match script.language {
        ScriptLanguage::PowerShell => {
            if !cfg!(windows) {
                return Err(ScriptError::RequiresWindows {
                    language: "PowerShell",
                });
            }
            // A signed script carries its signature block after the code.
            let body = powershell::script_text(&script.content, script.signature.as_deref());
            ("ps1", powershell::script_file(&body))
        }
        ScriptLanguage::Bash | ScriptLanguage::Sh => ("sh", script.content.clone().into_bytes()),
    };
    let path = work_dir.join(format!("{}.{extension}", run.stem));
    std::fs::create_dir_all(work_dir)
        .and_then(|()| std::fs::write(&path, body))
        .map_err(|source| ScriptError::Write {
            path: path.clone(),
            source,
        })?;
    let (program, args) = interpreter_command(script.language, &path, run.bypass_execution_policy);
    Ok(ProcessSpec {
        program,
        args,
        env: run.env.clone(),
        current_dir: Some(work_dir.to_path_buf()),
        timeout: run.timeout,
        capture_stdout: false,
        ..ProcessSpec::default()
    })
}

/// Program and arguments that run the script file at `path`.
pub fn interpreter_command(
    language: ScriptLanguage,
    path: &Path,
    bypass_execution_policy: bool,
) -> (PathBuf, Vec<String>) {
    let path = path.display().to_string();
    match language {
        ScriptLanguage::Bash => (
            "bash".into(),
            vec!["--noprofile".into(), "--norc".into(), path],
        ),
        ScriptLanguage::Sh => ("sh".into(), vec![path]),
        ScriptLanguage::PowerShell => {
            let mut args = vec!["-NoProfile".to_string(), "-NonInteractive".to_string()];
            if bypass_execution_policy {
                args.extend(["-ExecutionPolicy".to_string(), "Bypass".to_string()]);
            }
            args.extend(["-File".to_string(), path]);
            (powershell::powershell_exe(system_root().as_deref()), args)
        }
    }
}

/// Whether a parameter would replace one of the variables every child gets (PATH, or on
/// Windows `Path`, `ProgramFiles`, ...), compared ignoring case as Windows does.
fn is_reserved_parameter(name: &str) -> bool {
    crate::api::task::RESERVED_PARAMETER_NAMES
        .iter()
        .any(|reserved| reserved.eq_ignore_ascii_case(name))
}

fn system_root() -> Option<String> {
    std::env::var("SystemRoot").ok()
}

/// Command line for generated PowerShell (registry and uninstall actions, Windows
/// Update): the code goes into a file, which a short `-EncodedCommand` runs.
pub fn powershell_inline(
    code: &str,
    stem: &str,
    work_dir: &Path,
    timeout: Duration,
) -> Result<ProcessSpec, ScriptError> {
    if !cfg!(windows) {
        return Err(ScriptError::RequiresWindows {
            language: "PowerShell",
        });
    }
    let path = work_dir.join(format!("{stem}.ps1"));
    std::fs::create_dir_all(work_dir)
        .and_then(|()| std::fs::write(&path, powershell::script_file(code)))
        .map_err(|source| ScriptError::Write {
            path: path.clone(),
            source,
        })?;
    let (program, args) =
        powershell::generated_script_command(&path.display().to_string(), system_root().as_deref());
    Ok(ProcessSpec {
        program,
        args,
        env: BTreeMap::new(),
        current_dir: Some(work_dir.to_path_buf()),
        timeout,
        capture_stdout: true,
        ..ProcessSpec::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::common::ObjectRef;

    fn script(language: ScriptLanguage, content: &str) -> ResolvedScript {
        ResolvedScript {
            source: ObjectRef::new("s"),
            language,
            content: content.into(),
            sha256: content_sha256(content),
            signature: None,
        }
    }

    fn run(script: &ResolvedScript) -> ScriptRun<'_> {
        ScriptRun {
            script,
            stem: "pre-0".into(),
            env: BTreeMap::new(),
            bypass_execution_policy: false,
            timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn a_tampered_script_is_refused_before_it_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut tampered = script(ScriptLanguage::Bash, "echo hi");
        tampered.content.push_str("; rm -rf /tmp/x");
        let err = prepare(&run(&tampered), dir.path()).unwrap_err();
        assert!(matches!(err, ScriptError::HashMismatch { .. }), "{err}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn bash_and_sh_get_their_interpreters() {
        let dir = tempfile::tempdir().unwrap();
        let bash = prepare(&run(&script(ScriptLanguage::Bash, "echo hi")), dir.path()).unwrap();
        assert_eq!(bash.program, PathBuf::from("bash"));
        assert_eq!(bash.args[..2], ["--noprofile", "--norc"]);
        assert_eq!(std::fs::read_to_string(&bash.args[2]).unwrap(), "echo hi");
        let sh = prepare(&run(&script(ScriptLanguage::Sh, "echo hi")), dir.path()).unwrap();
        assert_eq!(sh.program, PathBuf::from("sh"));
    }

    #[test]
    fn powershell_bypasses_the_execution_policy_only_when_asked() {
        let path = Path::new("C:\\work\\pre-0.ps1");
        let (program, args) = interpreter_command(ScriptLanguage::PowerShell, path, false);
        assert_eq!(
            program,
            powershell::powershell_exe(std::env::var("SystemRoot").ok().as_deref())
        );
        assert_eq!(
            args,
            [
                "-NoProfile",
                "-NonInteractive",
                "-File",
                "C:\\work\\pre-0.ps1"
            ]
        );
        let (_, args) = interpreter_command(ScriptLanguage::PowerShell, path, true);
        assert_eq!(
            args,
            [
                "-NoProfile",
                "-NonInteractive",
                "-ExecutionPolicy",
                "Bypass",
                "-File",
                "C:\\work\\pre-0.ps1"
            ]
        );
    }

    #[test]
    fn parameters_cannot_replace_the_variables_every_script_gets() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "PATH",
            "path",
            "Path",
            "ProgramFiles",
            "SystemRoot",
            "HOME",
            "LC_ALL",
        ] {
            let echo = script(ScriptLanguage::Sh, "echo $PATH");
            let mut run = run(&echo);
            run.env.insert(name.into(), "/tmp/evil".into());
            let err = prepare(&run, dir.path()).unwrap_err();
            assert!(
                matches!(&err, ScriptError::ReservedParameter { name: n } if n == name),
                "{name}: {err}"
            );
        }
        let echo = script(ScriptLanguage::Sh, "echo $PATHS");
        let mut run = run(&echo);
        run.env.insert("PATHS".into(), "/ /var".into());
        run.env.insert("FLEETPATCH_JOB".into(), "job".into());
        assert!(prepare(&run, dir.path()).is_ok());
    }

    #[cfg(not(windows))]
    #[test]
    fn powershell_needs_windows() {
        let dir = tempfile::tempdir().unwrap();
        let err = prepare(
            &run(&script(ScriptLanguage::PowerShell, "Write-Host hi")),
            dir.path(),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "PowerShell scripts need Windows PowerShell; this host is not Windows"
        );
    }
}
