//! How the operator reaches a Broker: only through its admin API (`petrel.admin.v1`), on
//! the brokers' internal port behind the Broker's headless Service.

use std::time::Duration;

use kube::ResourceExt;
use petrel_api::admin::v1::admin_client::AdminClient;
use tonic::transport::{Channel, Endpoint};

use crate::crd::Broker;
use crate::error::Error;

/// The brokers' internal port, where the admin API is served.
pub const ADMIN_PORT: u16 = 9470;

/// Annotation on a Broker giving its admin API's URL instead of the Service's, for an
/// operator running outside the cluster (through a port-forward, say).
pub const ADMIN_URL_ANNOTATION: &str = "petrel.io/admin-url";

/// How long connecting to a broker may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one admin call may take (a create waits for a metadata commit).
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// The name of a Broker's headless Service (peer discovery, admin API).
pub fn headless_service(broker: &str) -> String {
    format!("{broker}-headless")
}

/// Where the admin API of `broker` is: its annotation's URL, else any of its pods
/// through the headless Service.
pub fn admin_url(broker: &Broker) -> String {
    if let Some(url) = broker.annotations().get(ADMIN_URL_ANNOTATION) {
        return url.clone();
    }
    let namespace = broker.namespace().unwrap_or_else(|| "default".to_owned());
    format!(
        "http://{}.{namespace}.svc:{ADMIN_PORT}",
        headless_service(&broker.name_any())
    )
}

/// A client of `broker`'s admin API.
pub async fn connect(broker: &Broker) -> Result<AdminClient<Channel>, Error> {
    let url = admin_url(broker);
    let unreachable = |reason: String| Error::Unreachable {
        url: url.clone(),
        reason,
    };
    let channel = Endpoint::from_shared(url.clone())
        .map_err(|e| unreachable(e.to_string()))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(CALL_TIMEOUT)
        .connect()
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    Ok(AdminClient::new(channel))
}
