//! Raw requests to a test cluster's API server through kube-rs, for what kubectl hides:
//! the exact `Status` of a refusal (reason, causes and their field paths).

use std::path::Path;

use kube::core::Status;
use serde_json::Value;

/// A kube-rs client with its own runtime, for synchronous tests.
pub struct RawApi {
    client: kube::Client,
    runtime: tokio::runtime::Runtime,
}

impl RawApi {
    pub fn new(kubeconfig: &Path) -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let client = runtime.block_on(async {
            let kubeconfig = kube::config::Kubeconfig::read_from(kubeconfig).unwrap();
            let config = kube::Config::from_custom_kubeconfig(
                kubeconfig,
                &kube::config::KubeConfigOptions::default(),
            )
            .await
            .unwrap();
            kube::Client::try_from(config).unwrap()
        });
        Self { client, runtime }
    }

    /// `method path` with a JSON body: the answer's JSON, or the server's `Status`.
    pub fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, Box<Status>> {
        let request = http::Request::builder()
            .method(method)
            .uri(path)
            .header("Content-Type", "application/json")
            .body(
                body.map(|b| serde_json::to_vec(b).unwrap())
                    .unwrap_or_default(),
            )
            .unwrap();
        match self.runtime.block_on(self.client.request_text(request)) {
            Ok(text) => Ok(serde_json::from_str(&text).unwrap_or(Value::String(text))),
            Err(kube::Error::Api(status)) => Err(status),
            Err(other) => panic!("{method} {path}: {other}"),
        }
    }

    /// Creates a fleetpatch object (in `namespace` unless it is an Agent), as a dry run
    /// when asked, with strict field validation.
    pub fn create(
        &self,
        object: &Value,
        namespace: &str,
        dry_run: bool,
    ) -> Result<Value, Box<Status>> {
        let mut query = String::from("?fieldValidation=Strict");
        if dry_run {
            query.push_str("&dryRun=All");
        }
        self.send(
            "POST",
            &format!("{}{query}", collection(object, namespace)),
            Some(object),
        )
    }

    /// Replaces a fleetpatch object (a PUT carrying the object's resourceVersion).
    pub fn replace(&self, object: &Value, namespace: &str) -> Result<Value, Box<Status>> {
        let name = object["metadata"]["name"].as_str().unwrap();
        self.send(
            "PUT",
            &format!(
                "{}/{name}?fieldValidation=Strict",
                collection(object, namespace)
            ),
            Some(object),
        )
    }
}

/// The collection path of a fleetpatch object's kind.
pub fn collection(object: &Value, namespace: &str) -> String {
    let kind = object["kind"].as_str().unwrap();
    let plural = format!("{}s", kind.to_ascii_lowercase());
    if kind == "Agent" {
        format!("/apis/fleetpatch.io/v1alpha1/{plural}")
    } else {
        format!("/apis/fleetpatch.io/v1alpha1/namespaces/{namespace}/{plural}")
    }
}

/// Every cause of a refusal as `field: message`, and the message itself.
pub fn describe(status: &Status) -> Vec<String> {
    let mut lines: Vec<String> = status
        .details
        .iter()
        .flat_map(|d| d.causes.iter())
        .map(|c| format!("{}: {}", c.field, c.message))
        .collect();
    lines.push(status.message.clone());
    lines
}
