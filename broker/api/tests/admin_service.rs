//! The generated admin contract works end to end: a server implementing `Admin` answers a
//! generated client over a real loopback connection, and messages survive encoding.

use petrel_api::admin::v1::admin_client::AdminClient;
use petrel_api::admin::v1::admin_server::{Admin, AdminServer};
use petrel_api::admin::v1::{self, GetNodeStatusRequest, GetNodeStatusResponse};
use prost::Message;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

/// A node that always reports the same status.
struct FixedNode(GetNodeStatusResponse);

#[tonic::async_trait]
impl Admin for FixedNode {
    async fn get_node_status(
        &self,
        _request: Request<GetNodeStatusRequest>,
    ) -> Result<Response<GetNodeStatusResponse>, Status> {
        Ok(Response::new(self.0.clone()))
    }

    async fn get_cluster_status(
        &self,
        _request: Request<v1::GetClusterStatusRequest>,
    ) -> Result<Response<v1::ClusterStatus>, Status> {
        Err(Status::unimplemented("a fixed node has no cluster"))
    }

    async fn create_destination(
        &self,
        _request: Request<v1::CreateDestinationRequest>,
    ) -> Result<Response<v1::Destination>, Status> {
        Err(Status::unimplemented("a fixed node has no destinations"))
    }

    async fn update_destination(
        &self,
        _request: Request<v1::UpdateDestinationRequest>,
    ) -> Result<Response<v1::Destination>, Status> {
        Err(Status::unimplemented("a fixed node has no destinations"))
    }

    async fn get_destination(
        &self,
        _request: Request<v1::DestinationRef>,
    ) -> Result<Response<v1::Destination>, Status> {
        Err(Status::unimplemented("a fixed node has no destinations"))
    }

    async fn list_destinations(
        &self,
        _request: Request<v1::ListDestinationsRequest>,
    ) -> Result<Response<v1::ListDestinationsResponse>, Status> {
        Ok(Response::new(v1::ListDestinationsResponse::default()))
    }

    async fn delete_destination(
        &self,
        _request: Request<v1::DestinationRef>,
    ) -> Result<Response<v1::Destination>, Status> {
        Err(Status::unimplemented("a fixed node has no destinations"))
    }

    async fn decommission_node(
        &self,
        _request: Request<v1::NodeRef>,
    ) -> Result<Response<v1::DecommissionProgress>, Status> {
        Err(Status::unimplemented("a fixed node has no cluster"))
    }

    async fn get_decommission_progress(
        &self,
        _request: Request<v1::NodeRef>,
    ) -> Result<Response<v1::DecommissionProgress>, Status> {
        Err(Status::unimplemented("a fixed node has no cluster"))
    }

    async fn add_node(
        &self,
        _request: Request<v1::AddNodeRequest>,
    ) -> Result<Response<v1::ClusterStatus>, Status> {
        Err(Status::unimplemented("a fixed node has no cluster"))
    }

    async fn transfer_leadership(
        &self,
        _request: Request<v1::TransferLeadershipRequest>,
    ) -> Result<Response<v1::PartitionStatus>, Status> {
        Err(Status::unimplemented("a fixed node has no destinations"))
    }

    async fn create_vhost(
        &self,
        _request: Request<v1::VhostRef>,
    ) -> Result<Response<v1::Vhost>, Status> {
        Err(Status::unimplemented("a fixed node has no vhosts"))
    }

    async fn delete_vhost(
        &self,
        _request: Request<v1::VhostRef>,
    ) -> Result<Response<v1::Vhost>, Status> {
        Err(Status::unimplemented("a fixed node has no vhosts"))
    }

    async fn list_vhosts(
        &self,
        _request: Request<v1::ListVhostsRequest>,
    ) -> Result<Response<v1::ListVhostsResponse>, Status> {
        Err(Status::unimplemented("a fixed node has no vhosts"))
    }

    async fn put_user(
        &self,
        _request: Request<v1::PutUserRequest>,
    ) -> Result<Response<v1::User>, Status> {
        Err(Status::unimplemented("a fixed node has no users"))
    }

    async fn delete_user(
        &self,
        _request: Request<v1::UserRef>,
    ) -> Result<Response<v1::User>, Status> {
        Err(Status::unimplemented("a fixed node has no users"))
    }

    async fn list_users(
        &self,
        _request: Request<v1::ListUsersRequest>,
    ) -> Result<Response<v1::ListUsersResponse>, Status> {
        Err(Status::unimplemented("a fixed node has no users"))
    }

    async fn set_permission(
        &self,
        _request: Request<v1::SetPermissionRequest>,
    ) -> Result<Response<v1::User>, Status> {
        Err(Status::unimplemented("a fixed node has no users"))
    }

    async fn cancel_decommission(
        &self,
        _request: Request<v1::NodeRef>,
    ) -> Result<Response<v1::DecommissionProgress>, Status> {
        Err(Status::unimplemented("a fixed node has no cluster"))
    }

    async fn remove_node(
        &self,
        _request: Request<v1::NodeRef>,
    ) -> Result<Response<v1::ClusterStatus>, Status> {
        Err(Status::unimplemented("a fixed node has no cluster"))
    }

    async fn bind(&self, _request: Request<v1::Binding>) -> Result<Response<v1::Binding>, Status> {
        Err(Status::unimplemented("a fixed node has no queues"))
    }

    async fn unbind(
        &self,
        _request: Request<v1::Binding>,
    ) -> Result<Response<v1::Binding>, Status> {
        Err(Status::unimplemented("a fixed node has no queues"))
    }

    async fn list_bindings(
        &self,
        _request: Request<v1::ListBindingsRequest>,
    ) -> Result<Response<v1::ListBindingsResponse>, Status> {
        Err(Status::unimplemented("a fixed node has no queues"))
    }
}

fn status() -> GetNodeStatusResponse {
    GetNodeStatusResponse {
        node_id: 2,
        version: "0.1.0".to_owned(),
        data_dir: "/var/lib/petrel".to_owned(),
        ready: true,
    }
}

#[test]
fn node_status_survives_encoding() {
    let bytes = status().encode_to_vec();
    let decoded = GetNodeStatusResponse::decode(bytes.as_slice()).expect("valid encoding");
    assert_eq!(decoded, status());
}

#[tokio::test]
async fn generated_client_reads_node_status_from_generated_server() {
    let incoming =
        TcpIncoming::bind("127.0.0.1:0".parse().expect("literal address")).expect("bind loopback");
    let addr = incoming.local_addr().expect("bound address");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        Server::builder()
            .add_service(AdminServer::new(FixedNode(status())))
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            }),
    );

    let mut client = AdminClient::connect(format!("http://{addr}"))
        .await
        .expect("connect to loopback server");
    let reply = client
        .get_node_status(GetNodeStatusRequest {})
        .await
        .expect("GetNodeStatus succeeds")
        .into_inner();
    assert_eq!(reply, status());

    drop(client);
    let _ = stop.send(());
    server
        .await
        .expect("server task joins")
        .expect("server stops cleanly");
}
