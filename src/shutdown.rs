//! When a long-running command (the controller, the dev server) is asked to stop:
//! Ctrl-C or SIGTERM, the signal Kubernetes sends a pod before it kills it.

/// Resolves at Ctrl-C or SIGTERM.
pub async fn requested() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            let _ = interrupt.await;
            return;
        };
        tokio::select! {
            _ = interrupt => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
