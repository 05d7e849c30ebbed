//! The seed's `/p2p/*` lines as written in its README, ownership of a
//! node_id, deletion only with the node's or the operator's key, bounded
//! and validated bodies, and no outbound connection to a registered address.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpListener;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::common::ws::{login_as, peer_model};
use crate::common::*;
use ed25519_dalek::{Signer as _, SigningKey};
use relay::peer_api::p2p::{delete_message, register_message, NodeList, MAX_REGISTER_BODY};
use web_node::net::api::codes;
use web_node::net::peer::ToRelay;

struct Env {
    _tmp: tempfile::TempDir,
    data: std::path::PathBuf,
    relay: TestRelay,
}

fn env() -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let model = peer_model(tmp.path());
    let data = tmp.path().join("data");
    let relay = TestRelay::start(&data, Some(&model), None);
    Env {
        _tmp: tmp,
        data,
        relay,
    }
}

/// The seed README's registration body, verbatim.
const SEED_BODY: &str = r#"{
    "node_id": "node1",
    "host": "localhost", 
    "port": 8001,
    "available_experts": ["layer0.expert0", "layer0.expert1", "layer1.expert0"]
  }"#;

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn register(url: &str, body: &[u8]) -> Resp {
    post_json(&format!("{url}/p2p/register"), body)
}

fn register_signed(url: &str, body: &[u8], node_id: &str, k: &SigningKey) -> Resp {
    let ts = now_s().to_string();
    let sig = k.sign(&register_message(node_id, &ts, body));
    to_resp(
        ureq::post(&format!("{url}/p2p/register"))
            .set("content-type", "application/json")
            .set("x-aiblock-key", &hex::encode(k.verifying_key().to_bytes()))
            .set("x-aiblock-timestamp", &ts)
            .set("x-aiblock-signature", &hex::encode(sig.to_bytes()))
            .send_bytes(body),
    )
}

fn delete_signed(url: &str, id: &str, k: &SigningKey, ts: u64) -> Resp {
    let ts = ts.to_string();
    let sig = k.sign(&delete_message(id, &ts));
    to_resp(
        ureq::delete(&format!("{url}/p2p/nodes/{id}"))
            .set("x-aiblock-key", &hex::encode(k.verifying_key().to_bytes()))
            .set("x-aiblock-timestamp", &ts)
            .set("x-aiblock-signature", &hex::encode(sig.to_bytes()))
            .call(),
    )
}

fn nodes(url: &str) -> NodeList {
    let r = get(&format!("{url}/p2p/nodes"));
    assert_eq!(r.status, 200);
    r.json()
}

#[test]
fn the_seed_curl_lines_work_as_written() {
    let e = env();
    let url = &e.relay.url;
    // curl -X POST /p2p/register -H "Content-Type: application/json" -d '{...}'
    let r = register(url, SEED_BODY.as_bytes());
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let v: serde_json::Value = r.json();
    assert_eq!(v["status"], "registered");
    assert_eq!(v["node_id"], "node1");
    // curl -X GET /p2p/nodes
    let list = nodes(url);
    assert_eq!((list.registered, list.ws_peers), (1, 0));
    let n = &list.nodes[0];
    assert_eq!(
        (n.node_id.as_str(), n.kind.as_str()),
        ("node1", "registered")
    );
    assert_eq!(n.host.as_deref(), Some("localhost"));
    assert_eq!(n.port, Some(8001));
    assert_eq!(
        n.available_experts,
        ["layer0.expert0", "layer0.expert1", "layer1.expert0"]
    );
    // curl -X DELETE /p2p/nodes/node1: no credentials, a clear 401.
    let r = to_resp(ureq::delete(&format!("{url}/p2p/nodes/node1")).call());
    let err = r.error(401);
    assert!(err.message.contains("X-AIBlock-Key"), "{}", err.message);
    assert!(err.message.contains("operator"), "{}", err.message);
    assert_eq!(nodes(url).registered, 1, "nothing deleted");
    // Signed by the relay operator: deleted.
    let op = operator_key(&e.data);
    let r = delete_signed(url, "node1", &op, now_s());
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(nodes(url).registered, 0);
    // Unknown now.
    assert_eq!(
        delete_signed(url, "node1", &op, now_s()).error(404).code,
        codes::NOT_FOUND
    );
    // Registering again updates rather than duplicates.
    assert_eq!(register(url, SEED_BODY.as_bytes()).status, 201);
    assert_eq!(register(url, SEED_BODY.as_bytes()).status, 200);
    assert_eq!(nodes(url).registered, 1);
}

#[test]
fn a_signed_registration_owns_its_id() {
    let e = env();
    let url = &e.relay.url;
    let owner = SigningKey::from_bytes(&[1; 32]);
    let other = SigningKey::from_bytes(&[2; 32]);
    let body = br#"{"node_id":"n-2","host":"10.0.0.2","port":9000,"available_experts":["layer0.expert1"]}"#;
    let r = register_signed(url, body, "n-2", &owner);
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let owner_hex = hex::encode(owner.verifying_key().to_bytes());
    assert_eq!(
        nodes(url).nodes[0].owner.as_deref(),
        Some(owner_hex.as_str())
    );
    // Unsigned, or signed by another key: 409, unchanged.
    let hijack = br#"{"node_id":"n-2","host":"evil.example","port":1,"available_experts":[]}"#;
    assert_eq!(register(url, hijack).error(409).code, codes::DUPLICATE);
    assert_eq!(register_signed(url, hijack, "n-2", &other).status, 409);
    assert_eq!(nodes(url).nodes[0].host.as_deref(), Some("10.0.0.2"));
    // A signature over another body does not verify.
    let ts = now_s().to_string();
    let sig = owner.sign(&register_message("n-2", &ts, body));
    let r = to_resp(
        ureq::post(&format!("{url}/p2p/register"))
            .set("content-type", "application/json")
            .set("x-aiblock-key", &owner_hex)
            .set("x-aiblock-timestamp", &ts)
            .set("x-aiblock-signature", &hex::encode(sig.to_bytes()))
            .send_bytes(hijack),
    );
    assert_eq!(r.error(401).code, codes::BAD_SIGNATURE);
    // The owner may update it.
    let moved = br#"{"node_id":"n-2","host":"10.0.0.3","port":9001,"available_experts":[]}"#;
    assert_eq!(register_signed(url, moved, "n-2", &owner).status, 200);
    assert_eq!(nodes(url).nodes[0].host.as_deref(), Some("10.0.0.3"));
    // Deleting: another key is forbidden, a stale timestamp is refused,
    // the owner's fresh signature works.
    assert_eq!(
        delete_signed(url, "n-2", &other, now_s()).error(403).code,
        codes::FORBIDDEN
    );
    let stale = delete_signed(url, "n-2", &owner, now_s() - 3600).error(401);
    assert!(stale.message.contains("clock"), "{}", stale.message);
    // A signature for another id does not delete this one.
    let ts = now_s().to_string();
    let sig = owner.sign(&delete_message("n-3", &ts));
    let r = to_resp(
        ureq::delete(&format!("{url}/p2p/nodes/n-2"))
            .set("x-aiblock-key", &owner_hex)
            .set("x-aiblock-timestamp", &ts)
            .set("x-aiblock-signature", &hex::encode(sig.to_bytes()))
            .call(),
    );
    assert_eq!(r.status, 401);
    assert_eq!(nodes(url).registered, 1);
    assert_eq!(delete_signed(url, "n-2", &owner, now_s()).status, 200);
    assert_eq!(nodes(url).registered, 0);
}

#[test]
fn malformed_and_oversized_bodies_are_refused_and_nothing_is_stored() {
    let e = env();
    let url = &e.relay.url;
    let bad: &[(&[u8], &str)] = &[
        (b"not json", "JSON"),
        (br#"{"node_id":"x","host":"h"}"#, "port"),
        (br#"{"node_id":"","host":"h","port":1}"#, "node_id"),
        (br#"{"node_id":"a b","host":"h","port":1}"#, "node_id"),
        (br#"{"node_id":"a","host":"h/../x","port":1}"#, "host"),
        (br#"{"node_id":"a","host":"h","port":0}"#, "port"),
        (br#"{"node_id":"a","host":"h","port":70000}"#, "port"),
        (br#"{"node_id":"a","host":"h","port":-1}"#, "port"),
        (
            br#"{"node_id":"a","host":"h","port":1,"available_experts":["rm -rf"]}"#,
            "slot name",
        ),
    ];
    for (body, want) in bad {
        let err = register(url, body).error(400);
        assert!(
            err.message.contains(want),
            "{}: {}",
            String::from_utf8_lossy(body),
            err.message
        );
    }
    let long_id = format!(r#"{{"node_id":"{}","host":"h","port":1}}"#, "a".repeat(65));
    register(url, long_id.as_bytes()).error(400);
    let many: Vec<String> = (0..4097).map(|i| format!("layer{i}.expert0")).collect();
    let body = serde_json::json!({"node_id":"m","host":"h","port":1,"available_experts":many});
    register(url, &serde_json::to_vec(&body).unwrap()).error(400);
    // Refused from its declared length, before the body is read: send only
    // the header (a client streaming the body would see the relay close the
    // connection on it, EPIPE, before it reads the 413).
    let (status, text) = raw(
        &e.relay.addr(),
        format!(
            "POST /p2p/register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            MAX_REGISTER_BODY + 1
        )
        .as_bytes(),
    );
    assert_eq!(status, 413, "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{text}"
    );
    assert!(text.contains(codes::TOO_LARGE), "{text}");
    let r = to_resp(
        ureq::post(&format!("{url}/p2p/register"))
            .set("content-type", "text/plain")
            .send_string(SEED_BODY),
    );
    r.error(415);
    assert_eq!(nodes(url).registered, 0, "nothing stored");
}

#[test]
fn registrations_are_rate_limited_per_ip() {
    let e = env();
    let url = &e.relay.url;
    let mut limited = None;
    for i in 0..100 {
        let body = format!(r#"{{"node_id":"n{i}","host":"h","port":1}}"#);
        let r = register(url, body.as_bytes());
        if r.status == 429 {
            limited = Some(i);
            assert!(r.retry_after.is_some());
            break;
        }
        assert_eq!(r.status, 201);
    }
    let i = limited.expect("rate limited");
    // The burst, plus what refilled (one a second) while the loop ran.
    assert!(i >= relay::peer_api::p2p::REGISTER_BURST as usize, "{i}");
    assert_eq!(nodes(url).registered, i);
}

#[test]
fn the_relay_never_dials_a_registered_address() {
    let e = env();
    let url = &e.relay.url;
    // Something listens at the registered address: the relay must not connect.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let port = l.local_addr().unwrap().port();
    let body = format!(
        r#"{{"node_id":"trap","host":"127.0.0.1","port":{port},"available_experts":["layer0.expert0"]}}"#
    );
    assert_eq!(register(url, body.as_bytes()).status, 201);
    let listed = nodes(url);
    assert_eq!(listed.nodes[0].port, Some(port));
    // Deleting, listing again and a while of serving: still no connection.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let op = operator_key(&e.data);
    assert_eq!(delete_signed(url, "trap", &op, now_s()).status, 200);
    match l.accept() {
        Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the relay connected to the registered address: {other:?}"),
    }
}

#[test]
fn websocket_peers_are_listed_with_what_they_hold_and_can_be_removed() {
    let e = env();
    let url = e.relay.url.clone();
    let addr = e.relay.addr();
    let b = list(&url, "B");
    let expert = b.iter().find(|i| i.name == "layer0.expert1").unwrap().hash;
    let k = SigningKey::from_bytes(&[5; 32]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut ws = rt.block_on(async {
        let mut ws = login_as(&addr, &k).await;
        crate::common::ws::send(
            &mut ws,
            &ToRelay::Status {
                load: 250,
                serve_compute: true,
            },
        )
        .await;
        crate::common::ws::send(
            &mut ws,
            &ToRelay::Have {
                add: vec![expert],
                remove: vec![],
            },
        )
        .await;
        ws
    });
    let peers = e.relay.state.peers.clone();
    let id = k.verifying_key().to_bytes();
    rt.block_on(crate::common::ws::until("the Have", || {
        peers.holders_of(&expert) == vec![id]
    }));
    let l = nodes(&url);
    assert_eq!((l.registered, l.ws_peers), (0, 1));
    let n = &l.nodes[0];
    assert_eq!(n.kind, "ws");
    assert_eq!(n.node_id, hex::encode(id));
    assert_eq!(n.blocks, vec![expert.to_hex()]);
    assert_eq!(n.available_experts, vec!["layer0.expert1".to_string()]);
    assert_eq!(
        (n.load, n.serve_compute, n.banned),
        (Some(250), true, false)
    );
    assert_eq!(n.agent.as_deref(), Some("test-peer"));
    // Another key may not remove it; its own key may.
    let other = SigningKey::from_bytes(&[6; 32]);
    delete_signed(&url, &hex::encode(id), &other, now_s()).error(403);
    assert_eq!(
        delete_signed(&url, &hex::encode(id), &k, now_s()).status,
        200
    );
    rt.block_on(async {
        let (code, _) = crate::common::ws::expect_error(&mut ws).await;
        assert_eq!(code, web_node::net::peer::codes::UNAVAILABLE);
        crate::common::ws::until("the peer gone", || peers.views().is_empty()).await;
    });
}
