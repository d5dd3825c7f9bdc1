//! The `fleetpatch` command: one binary for every part of the operator. Built without
//! the `full` feature it is the agent alone: the `agent` subcommands, help and version.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "fleetpatch",
    version,
    about = "Patch fleets of machines from Kubernetes, with pre- and post-patching actions"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    #[cfg(feature = "full")]
    #[command(flatten)]
    Operator(operator::Command),
    /// The agent that runs patch jobs on a host.
    Agent {
        #[command(subcommand)]
        command: AgentCommand,
    },
}

#[derive(Subcommand)]
enum AgentCommand {
    /// Run a workflow on this host from manifest files, without a cluster.
    ///
    /// Prints each action as it starts and ends (or, with `-o json`, the final PatchJob
    /// status) and exits 0 only if the job succeeded: 1 when it failed, 2 on bad input,
    /// 3 when the host is rebooting (run the same command again afterwards to finish).
    Exec(fleetpatch::agent::local::ExecOptions),
    /// Connect to a gateway, register, and run the jobs it assigns (external hosts with
    /// --token-file, cluster nodes with --node).
    Run(fleetpatch::agent::remote::RunOptions),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    fleetpatch::tls::install_crypto_provider();
    let result = match cli.command {
        #[cfg(feature = "full")]
        Command::Operator(command) => operator::run(command),
        Command::Agent { command } => run_agent(command),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}

fn run_agent(command: AgentCommand) -> anyhow::Result<ExitCode> {
    match command {
        AgentCommand::Run(options) => {
            fleetpatch::logs::init_json();
            Ok(ExitCode::from(
                runtime()?.block_on(fleetpatch::agent::remote::run(options))?,
            ))
        }
        AgentCommand::Exec(options) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            Ok(ExitCode::from(
                runtime.block_on(fleetpatch::agent::local::exec(options))?,
            ))
        }
    }
}

/// Everything but the agent: the controller, the dev server, and the commands that read
/// manifests or talk to a cluster.
#[cfg(feature = "full")]
mod operator {
    use std::path::PathBuf;
    use std::process::ExitCode;

    use anyhow::Context;
    use clap::Subcommand;

    use fleetpatch::manifests;

    #[derive(Subcommand)]
    pub enum Command {
        /// Print every fleetpatch CustomResourceDefinition as multi-document YAML.
        Crds {
            /// Write one file per CRD into this directory instead of printing.
            #[arg(long)]
            out_dir: Option<PathBuf>,
        },
        /// Check manifests offline: schema, CEL rules and cross-object rules, for CI pipelines.
        ///
        /// Prints one line per problem as `FILE:DOC Kind/name: field.path: message`.
        /// Exit status: 0 when clean, 1 when any problem was found, 2 when input could not be read.
        Validate {
            /// Files or directories of multi-document YAML (directories are read recursively).
            #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
            paths: Vec<PathBuf>,
            /// Namespace of the built-in library that references may point into.
            #[arg(long, default_value = fleetpatch::api::rules::DEFAULT_LIBRARY_NAMESPACE)]
            library_namespace: String,
            /// Namespace assumed for objects that name none.
            #[arg(long, default_value = "default")]
            namespace: String,
            /// Do not print notes about documents of other API groups.
            #[arg(long, short)]
            quiet: bool,
            /// Check plans as for hosts that patch with this package manager (repeatable):
            /// a plan selecting classifications it cannot install is refused.
            #[arg(long = "patcher", value_parser = ["apt", "dnf", "yum", "zypper", "windows-update"])]
            patchers: Vec<String>,
        },
        /// Run an embedded Kubernetes-compatible API server for development and tests.
        ///
        /// NOT FOR PRODUCTION: plain HTTP on loopback, every caller is the admin, nothing
        /// runs workloads, everything lives in one process.
        /// It serves discovery, OpenAPI v3, CRDs (with schema validation, defaulting,
        /// pruning and CEL rules), built-in kinds such as Namespace, Secret, ConfigMap,
        /// Lease and Node, watches, patches and server-side apply, so kubectl, helm and
        /// the fleetpatch controller can run against it on one machine. It writes a
        /// kubeconfig (context `fleetpatch-dev`) and prints the `export KUBECONFIG=...` line.
        Dev {
            /// Address to listen on (port 0 picks a free port).
            #[arg(long, default_value = "127.0.0.1:6443")]
            listen: std::net::SocketAddr,
            /// Where to write the kubeconfig [default: DATA_DIR/kubeconfig, or
            /// ./fleetpatch-dev.kubeconfig without a data directory].
            #[arg(long)]
            kubeconfig: Option<PathBuf>,
            /// Keep objects here so they survive a restart; without it everything is in memory.
            #[arg(long)]
            data_dir: Option<PathBuf>,
            /// Seconds between watch bookmarks (tests shorten it).
            #[arg(long, default_value_t = 10, hide = true)]
            bookmark_interval_seconds: u64,
        },
        /// Run the operator: reconcilers, built-in library, agent gateway, metrics.
        Controller(fleetpatch::controller::ControllerOptions),
        /// Ask the controller for something now.
        Run {
            #[command(subcommand)]
            command: RunCommand,
        },
        /// Copy a Workflow, Task or Script (say, of the read-only built-in library) under a
        /// new name into your namespace, to edit there. The copy is never a default
        /// workflow; with --deep it takes its tasks and scripts along. Creates the copy,
        /// or prints it with -o yaml for a GitOps repository.
        Duplicate(fleetpatch::duplicate::DuplicateOptions),
    }

    #[derive(Subcommand)]
    pub enum RunCommand {
        /// Start a run of a RemediationPlan now (sets the fleetpatch.io/run-requested annotation).
        Plan {
            name: String,
            #[arg(short, long, default_value = "default")]
            namespace: String,
        },
    }

    /// Sets the run-requested annotation of a plan to the current time.
    async fn request_run(name: &str, namespace: &str) -> anyhow::Result<String> {
        use fleetpatch::api::RemediationPlan;
        use kube::api::{Api, Patch, PatchParams};
        let client = kube::Client::try_default()
            .await
            .context("connecting to the Kubernetes API")?;
        let plans: Api<RemediationPlan> = Api::namespaced(client, namespace);
        let value = k8s_openapi::jiff::Timestamp::now()
            .strftime("%Y-%m-%dT%H:%M:%S%.3fZ")
            .to_string();
        let patch = serde_json::json!({"metadata": {"annotations": {fleetpatch::api::common::RUN_REQUESTED_ANNOTATION: value}}});
        plans
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .with_context(|| format!("requesting a run of remediationplan {namespace}/{name}"))?;
        Ok(value)
    }

    /// Servers hold a connection per agent or watcher: lift the soft limit on open files
    /// to the hard one, as most servers do.
    fn raise_open_files_limit() {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
            && soft < hard
            && let Err(err) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
        {
            eprintln!("warning: cannot raise the open files limit from {soft} to {hard}: {err}");
        }
    }

    /// glibc's malloc gives each thread that allocates its own arena (up to 8 per core);
    /// a server whose tokio workers allocate and free each other's memory all day then
    /// holds far more memory than it uses. Two arenas are plenty for a controller. (The
    /// static musl build has one allocator and nothing to tune.)
    fn limit_malloc_arenas() {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only sets an allocator parameter; called before any thread starts.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }

    pub fn run(command: Command) -> anyhow::Result<ExitCode> {
        if matches!(command, Command::Controller(_) | Command::Dev { .. }) {
            limit_malloc_arenas();
            raise_open_files_limit();
        }
        match command {
            Command::Controller(options) => {
                fleetpatch::logs::init_json();
                super::runtime()?.block_on(async {
                    let client = kube::Client::try_default()
                        .await
                        .context("connecting to the Kubernetes API")?;
                    fleetpatch::controller::run(client, options).await
                })?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Run {
                command: RunCommand::Plan { name, namespace },
            } => {
                let value = super::runtime()?.block_on(request_run(&name, &namespace))?;
                println!("requested a run of remediationplan {namespace}/{name} ({value})");
                Ok(ExitCode::SUCCESS)
            }
            Command::Duplicate(options) => {
                super::runtime()?.block_on(fleetpatch::duplicate::run(&options))?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Dev {
                listen,
                kubeconfig,
                data_dir,
                bookmark_interval_seconds,
            } => {
                fleetpatch::logs::init_text();
                let kubeconfig = kubeconfig.unwrap_or_else(|| match &data_dir {
                    Some(dir) => dir.join("kubeconfig"),
                    None => PathBuf::from("fleetpatch-dev.kubeconfig"),
                });
                let config = fleetpatch::devserver::Config {
                    listen,
                    kubeconfig,
                    data_dir,
                    bookmark_interval: std::time::Duration::from_secs(
                        bookmark_interval_seconds.max(1),
                    ),
                };
                super::runtime()?.block_on(fleetpatch::devserver::run(
                    config,
                    fleetpatch::shutdown::requested(),
                ))?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Crds { out_dir } => {
                match out_dir {
                    None => print!("{}", fleetpatch::crdgen::render_all()?),
                    Some(dir) => fleetpatch::crdgen::write_dir(&dir)
                        .with_context(|| format!("writing {}", dir.display()))?,
                }
                Ok(ExitCode::SUCCESS)
            }
            Command::Validate {
                paths,
                library_namespace,
                namespace,
                quiet,
                patchers,
            } => Ok(validate(
                &paths,
                manifests::CheckOptions {
                    library_namespace,
                    default_namespace: namespace,
                    patchers,
                },
                quiet,
            )),
        }
    }

    /// `fleetpatch validate`: exit status 0 when every object passes, 1 with problems,
    /// 2 when a path cannot be read.
    fn validate(paths: &[PathBuf], options: manifests::CheckOptions, quiet: bool) -> ExitCode {
        let documents = match manifests::load(paths) {
            Ok(documents) => documents,
            Err(err) => {
                eprintln!("error: cannot read {err}");
                return ExitCode::from(2);
            }
        };
        let report = manifests::check(&documents, &manifests::Schemas::new(), &options);
        if !quiet {
            for note in &report.notes {
                eprintln!("note: {note}");
            }
        }
        for problem in &report.problems {
            println!("{problem}");
        }
        if report.problems.is_empty() {
            eprintln!("{} fleetpatch objects checked, no problems", report.checked);
            ExitCode::SUCCESS
        } else {
            eprintln!("{} problem(s) found", report.problems.len());
            ExitCode::from(1)
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Runtime::new().context("starting the async runtime")
}
