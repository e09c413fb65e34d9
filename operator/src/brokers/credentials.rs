//! A Broker's default user, as RabbitMQ's cluster operator gives one: a Secret
//! `<broker>-default-user` (username, password, host, port, uri) made once with a random
//! password, owned by the Broker, and the user made on the brokers through the admin API
//! (an administrator who may open the default vhost) whenever it is missing there. A
//! Secret made again (deleted by hand: a new password) is marked until its password is
//! set on the brokers, so a rotation is never lost to a broker that did not answer.

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use petrel_api::admin::v1 as api;
use petrel_api::admin::v1::admin_client::AdminClient;
use ring::rand::SecureRandom as _;
use serde_json::json;
use tonic::transport::Channel;

use super::desired;
use crate::context::Context;
use crate::crd::Broker;
use crate::error::Error;

/// The default user's name on the brokers.
pub const USERNAME: &str = "default_user";
/// Random bytes in a password (hex-encoded: no escaping in a URI).
const PASSWORD_BYTES: usize = 24;
/// Annotation on a Secret whose password is not yet set on the brokers.
const PENDING: &str = "petrel.io/password-pending";

/// The Secret's name.
pub fn secret_name(broker: &Broker) -> String {
    format!("{}-default-user", broker.name_any())
}

/// The Secret for `broker` with `password`: what a client needs to connect through the
/// Broker's client Service, marked as not yet set on the brokers.
pub fn secret(broker: &Broker, password: &str) -> Result<Secret, Error> {
    let host = format!(
        "{}.{}.svc",
        broker.name_any(),
        broker.namespace().unwrap_or_default()
    );
    let port = broker.spec.listeners.amqp.port;
    let mut secret: Secret = desired::object(
        broker,
        &secret_name(broker),
        json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "stringData": {
            "username": USERNAME,
            "password": password,
            "host": host,
            "port": port.to_string(),
            "uri": format!("amqp://{USERNAME}:{password}@{host}:{port}/%2f"),
        }}),
    )?;
    // Until the brokers have this password.
    secret
        .annotations_mut()
        .insert(PENDING.to_owned(), "true".to_owned());
    Ok(secret)
}

/// A fresh random password.
fn new_password() -> Result<String, Error> {
    let mut bytes = [0u8; PASSWORD_BYTES];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| Error::InvalidSpec("the system random source failed".to_owned()))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The default user's password, from its Secret (made first if there is none), and
/// whether the brokers may not have it yet.
pub async fn password(ctx: &Context, broker: &Broker) -> Result<(String, bool), Error> {
    let secrets: Api<Secret> =
        Api::namespaced(ctx.client.clone(), &broker.namespace().unwrap_or_default());
    let name = secret_name(broker);
    let found = match secrets.get_opt(&name).await? {
        Some(found) => found,
        None => {
            let made = secrets
                .create(&PostParams::default(), &secret(broker, &new_password()?)?)
                .await;
            match made {
                Ok(made) => {
                    let note = format!("made Secret {name} with the default user's credentials");
                    ctx.event(broker, false, "DefaultUserSecret", "Create", note)
                        .await;
                    made
                }
                // Made meanwhile (another reconcile): that one holds the password.
                Err(kube::Error::Api(e)) if e.code == 409 => secrets.get(&name).await?,
                Err(e) => return Err(e.into()),
            }
        }
    };
    let ByteString(bytes) = found
        .data
        .as_ref()
        .and_then(|d| d.get("password"))
        .ok_or_else(|| Error::InvalidSpec(format!("Secret {name} has no password")))?;
    let password = String::from_utf8(bytes.clone())
        .map_err(|_| Error::InvalidSpec(format!("Secret {name}: the password is not text")))?;
    Ok((password, found.annotations().contains_key(PENDING)))
}

/// Marks the Secret's password as set on the brokers.
pub async fn password_set(ctx: &Context, broker: &Broker) -> Result<(), Error> {
    let secrets: Api<Secret> =
        Api::namespaced(ctx.client.clone(), &broker.namespace().unwrap_or_default());
    let unmark = json!({"metadata": {"annotations": {PENDING: null}}});
    secrets
        .patch(
            &secret_name(broker),
            &PatchParams::default(),
            &Patch::Merge(&unmark),
        )
        .await?;
    Ok(())
}

/// Makes the default user on the brokers with `password` if it is not there (or sets
/// `password` if `pending`), and lets it open the default vhost; answers whether it had
/// to do anything.
pub async fn ensure_user(
    admin: &mut AdminClient<Channel>,
    password: &str,
    pending: bool,
) -> Result<bool, Error> {
    let users = admin
        .list_users(api::ListUsersRequest {})
        .await?
        .into_inner()
        .users;
    let found = users.iter().find(|u| u.name == USERNAME);
    let permitted = found.is_some_and(|u| u.vhosts.iter().any(|v| v == "/"));
    if permitted && !pending {
        return Ok(false);
    }
    if found.is_none() || pending {
        admin
            .put_user(api::PutUserRequest {
                name: USERNAME.to_owned(),
                password: password.to_owned(),
                tags: vec!["administrator".to_owned()],
            })
            .await?;
    }
    if !permitted {
        admin
            .set_permission(api::SetPermissionRequest {
                user: USERNAME.to_owned(),
                vhost: "/".to_owned(),
                allow: true,
            })
            .await?;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_secret_holds_what_a_client_needs_and_waits_to_be_set() {
        let broker: Broker = serde_json::from_value(json!({
            "apiVersion": "petrel.io/v1alpha1", "kind": "Broker",
            "metadata": {"name": "orders", "namespace": "shop", "uid": "u-1"},
            "spec": {"replicas": 3},
        }))
        .expect("a broker");
        let password = new_password().expect("random");
        assert_eq!(password.len(), 2 * PASSWORD_BYTES);
        assert_ne!(password, new_password().expect("random"));
        let secret = secret(&broker, &password).expect("secret");
        assert_eq!(secret.name_any(), "orders-default-user");
        assert!(secret.annotations().contains_key(PENDING));
        let data = secret.string_data.expect("data");
        assert_eq!(
            data["uri"],
            format!("amqp://default_user:{password}@orders.shop.svc:5672/%2f")
        );
        assert_eq!(data["host"], "orders.shop.svc");
        assert_eq!(data["port"], "5672");
    }
}
