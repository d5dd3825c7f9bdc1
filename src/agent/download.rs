//! Fetching an InstallSoftware installer over https, http or from a network share,
//! hashing it while it streams, and refusing it — deleted — when its SHA-256 does not
//! match. Nothing runs before the check passes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::api::patchjob::ResolvedDownload;
use crate::api::task::DownloadProtocol;

/// Largest installer accepted by default (4 GiB).
pub const DEFAULT_MAX_BYTES: u64 = 4 << 30;

#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error(
        "checksum mismatch for {file}: expected sha256 {expected}, got {actual}; the file was deleted"
    )]
    ChecksumMismatch {
        file: String,
        expected: String,
        actual: String,
    },
    #[error("{url}: {message}")]
    Http { url: String, message: String },
    #[error("{location} is larger than the {limit}-byte limit")]
    TooLarge { location: String, limit: u64 },
    #[error("{location}: {source}")]
    Io {
        location: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Unsupported(String),
}

/// Where the verified file is, and what it hashed to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Downloaded {
    pub path: PathBuf,
    pub sha256: String,
    pub bytes: u64,
}

/// Downloads `download` into `dir` (the agent's download folder), verifying its
/// SHA-256. On a mismatch the file is removed and an error returned.
pub async fn fetch(
    download: &ResolvedDownload,
    dir: &Path,
    max_bytes: u64,
) -> Result<Downloaded, DownloadError> {
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|source| DownloadError::Io {
            location: dir.display().to_string(),
            source,
        })?;
    let target = dir.join(&download.file_name);
    let partial = dir.join(format!(".{}.part", download.file_name));
    let result = match download.source.protocol {
        DownloadProtocol::Https | DownloadProtocol::Http => {
            let url = download.source.url.as_deref().unwrap_or_default();
            fetch_http(url, &partial, max_bytes).await
        }
        DownloadProtocol::NetworkShare => {
            let location = download.source.unc.as_deref().unwrap_or_default();
            copy_share(location, &partial, max_bytes).await
        }
    };
    let (actual, bytes) = match result {
        Ok(done) => done,
        Err(err) => {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(err);
        }
    };
    if !actual.eq_ignore_ascii_case(&download.sha256) {
        let _ = tokio::fs::remove_file(&partial).await;
        let _ = tokio::fs::remove_file(&target).await;
        return Err(DownloadError::ChecksumMismatch {
            file: download.file_name.clone(),
            expected: download.sha256.to_ascii_lowercase(),
            actual,
        });
    }
    tokio::fs::rename(&partial, &target)
        .await
        .map_err(|source| DownloadError::Io {
            location: target.display().to_string(),
            source,
        })?;
    Ok(Downloaded {
        path: target,
        sha256: actual,
        bytes,
    })
}

fn http_client() -> Result<reqwest::Client, DownloadError> {
    crate::tls::install_crypto_provider();
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(30))
        .user_agent(concat!("fleetpatch-agent/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|err| DownloadError::Http {
            url: String::new(),
            message: err.to_string(),
        })
}

async fn fetch_http(
    url: &str,
    partial: &Path,
    max_bytes: u64,
) -> Result<(String, u64), DownloadError> {
    let http_error = |err: reqwest::Error| DownloadError::Http {
        url: url.to_string(),
        message: err.to_string(),
    };
    let response = http_client()?.get(url).send().await.map_err(http_error)?;
    let status = response.status();
    if !status.is_success() {
        return Err(DownloadError::Http {
            url: url.to_string(),
            message: format!("server answered {status}"),
        });
    }
    if response
        .content_length()
        .is_some_and(|length| length > max_bytes)
    {
        return Err(DownloadError::TooLarge {
            location: url.to_string(),
            limit: max_bytes,
        });
    }
    let io = |source| DownloadError::Io {
        location: partial.display().to_string(),
        source,
    };
    let mut file = tokio::fs::File::create(partial).await.map_err(io)?;
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(http_error)?;
        bytes += chunk.len() as u64;
        if bytes > max_bytes {
            return Err(DownloadError::TooLarge {
                location: url.to_string(),
                limit: max_bytes,
            });
        }
        hasher.update(&chunk);
        file.write_all(&chunk).await.map_err(io)?;
    }
    file.sync_all().await.map_err(io)?;
    Ok((hex::encode(hasher.finalize()), bytes))
}

async fn copy_share(
    location: &str,
    partial: &Path,
    max_bytes: u64,
) -> Result<(String, u64), DownloadError> {
    if location.starts_with("\\\\") && !cfg!(windows) {
        return Err(DownloadError::Unsupported(format!(
            "{location} is a UNC path, which only Windows hosts can open; on Linux mount the share and give its absolute path"
        )));
    }
    let io = |location: &str| {
        let location = location.to_string();
        move |source| DownloadError::Io { location, source }
    };
    let mut source = tokio::fs::File::open(location)
        .await
        .map_err(io(location))?;
    let mut file = tokio::fs::File::create(partial)
        .await
        .map_err(io(&partial.display().to_string()))?;
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    let mut buffer = vec![0u8; 256 * 1024];
    loop {
        let n = source.read(&mut buffer).await.map_err(io(location))?;
        if n == 0 {
            break;
        }
        bytes += n as u64;
        if bytes > max_bytes {
            return Err(DownloadError::TooLarge {
                location: location.to_string(),
                limit: max_bytes,
            });
        }
        hasher.update(&buffer[..n]);
        file.write_all(&buffer[..n])
            .await
            .map_err(io(&partial.display().to_string()))?;
    }
    file.sync_all()
        .await
        .map_err(io(&partial.display().to_string()))?;
    Ok((hex::encode(hasher.finalize()), bytes))
}
