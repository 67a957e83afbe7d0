//! Writes after publish: `npm dist-tag`, `npm deprecate`, `npm unpublish`.

use bytes::Bytes;
use granary_format::Action;
use serde_json::{Value, json};

use crate::support::{
    DEMO_1_0_0, DEMO_1_1_0, INSTALL_ACCEPT, WIDGET, fixture_json, get, publish_fixture, put_json,
    registry, send, write_doc,
};

#[tokio::test]
async fn dist_tags_ls_add_rm() {
    let repo = registry();
    publish_fixture(&repo, DEMO_1_0_0).await;
    publish_fixture(&repo, DEMO_1_1_0).await;
    let tags = "-/package/granary-demo/dist-tags";
    let ls = get(&repo, tags).await;
    assert_eq!(ls.status(), 200);
    assert_eq!(ls.json(), json!({"latest": "1.0.0", "next": "1.1.0"}));

    // `npm dist-tag add granary-demo@1.0.0 old`: the body is a JSON string.
    let add = send(
        &repo,
        "PUT",
        &format!("{tags}/old"),
        &[("content-type", "application/json")],
        "\"1.0.0\"",
    )
    .await;
    assert_eq!(add.status(), 201, "{:?}", add.body());
    assert_eq!(add.action, Some(Action::Write));
    assert_eq!(add.json()["ok"], true);
    assert_eq!(get(&repo, tags).await.json()["old"], "1.0.0");
    assert_eq!(
        get(&repo, "granary-demo").await.json()["dist-tags"]["old"],
        "1.0.0"
    );

    // Moving latest.
    let mv = send(&repo, "PUT", &format!("{tags}/latest"), &[], "\"1.1.0\"").await;
    assert_eq!(mv.status(), 201);
    assert_eq!(get(&repo, tags).await.json()["latest"], "1.1.0");

    let rm = send(&repo, "DELETE", &format!("{tags}/old"), &[], Bytes::new()).await;
    assert_eq!(rm.status(), 200);
    assert_eq!(rm.action, Some(Action::Write));
    assert!(get(&repo, tags).await.json().get("old").is_none());
    let again = send(&repo, "DELETE", &format!("{tags}/old"), &[], Bytes::new()).await;
    assert_eq!(again.status(), 404);

    let latest = send(
        &repo,
        "DELETE",
        &format!("{tags}/latest"),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(latest.status(), 400);

    let missing = send(&repo, "PUT", &format!("{tags}/old"), &[], "\"9.9.9\"").await;
    assert_eq!(missing.status(), 404);
    for bad in ["1.x", "v2", "1"] {
        let r = send(&repo, "PUT", &format!("{tags}/{bad}"), &[], "\"1.0.0\"").await;
        assert_eq!(r.status(), 400, "{bad}");
    }
    let not_string = send(&repo, "PUT", &format!("{tags}/old"), &[], "{}").await;
    assert_eq!(not_string.status(), 400);
    let absent = get(&repo, "-/package/absent/dist-tags").await;
    assert_eq!(absent.status(), 404);
}

#[tokio::test]
async fn dist_tags_of_scoped_packages() {
    let repo = registry();
    publish_fixture(&repo, WIDGET).await;
    let add = send(
        &repo,
        "PUT",
        "-/package/@acme%2fwidget/dist-tags/next",
        &[],
        "\"0.1.0-beta.1\"",
    )
    .await;
    assert_eq!(add.status(), 201);
    let ls = get(&repo, "-/package/@acme%2fwidget/dist-tags")
        .await
        .json();
    assert_eq!(ls["next"], "0.1.0-beta.1");
    let rm = send(
        &repo,
        "DELETE",
        "-/package/@acme/widget/dist-tags/beta",
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(rm.status(), 200);
}

#[tokio::test]
async fn deprecate_round_trip_with_captured_bodies() {
    let repo = registry();
    publish_fixture(&repo, DEMO_1_0_0).await;
    publish_fixture(&repo, DEMO_1_1_0).await;

    // npm 11 sends the whole document back to `PUT {name}` (no -rev).
    let reply = put_json(
        &repo,
        "granary-demo",
        &fixture_json("deprecate-granary-demo-1.0.0.json"),
    )
    .await;
    assert_eq!(reply.status(), 200, "{:?}", reply.body());
    assert_eq!(reply.action, Some(Action::Publish));
    let full = get(&repo, "granary-demo").await.json();
    assert_eq!(full["versions"]["1.0.0"]["deprecated"], "use 1.1.0");
    assert!(full["versions"]["1.1.0"].get("deprecated").is_none());
    let abbr = send(
        &repo,
        "GET",
        "granary-demo",
        &[("accept", INSTALL_ACCEPT)],
        Bytes::new(),
    )
    .await;
    assert_eq!(abbr.json()["versions"]["1.0.0"]["deprecated"], "use 1.1.0");

    // `npm deprecate granary-demo@1.0.0 ""` sends `deprecated: ""`.
    let reply = put_json(
        &repo,
        "granary-demo",
        &fixture_json("undeprecate-granary-demo-1.0.0.json"),
    )
    .await;
    assert_eq!(reply.status(), 200);
    let full = get(&repo, "granary-demo").await.json();
    assert!(full["versions"]["1.0.0"].get("deprecated").is_none());
    assert_eq!(
        full["versions"].as_object().unwrap().len(),
        2,
        "nothing deleted"
    );
}

#[tokio::test]
async fn deprecate_via_our_own_write_document() {
    let repo = registry();
    publish_fixture(&repo, WIDGET).await;
    // What `npm deprecate` does: GET ?write=true, set the message, PUT it back.
    let mut doc = write_doc(&repo, "@acme%2fwidget").await;
    doc["versions"]["0.1.0-beta.1"]["deprecated"] = json!("no longer maintained");
    assert_eq!(put_json(&repo, "@acme%2fwidget", &doc).await.status(), 200);
    let after = get(&repo, "@acme%2fwidget").await.json();
    assert_eq!(
        after["versions"]["0.1.0-beta.1"]["deprecated"],
        "no longer maintained"
    );
    assert_ne!(after["_rev"], doc["_rev"], "a change makes a new _rev");
    // The tarball URL is still ours, and still only rendered.
    assert!(
        after["versions"]["0.1.0-beta.1"]["dist"]["tarball"]
            .as_str()
            .unwrap()
            .ends_with("@acme/widget/-/widget-0.1.0-beta.1.tgz")
    );
}

#[tokio::test]
async fn updates_without_versions_change_nothing() {
    let repo = registry();
    publish_fixture(&repo, DEMO_1_0_0).await;
    let before = get(&repo, "granary-demo").await.json();
    // `npm star` style: no versions, no attachments.
    let star = json!({"_id": "granary-demo", "_rev": before["_rev"], "users": {"alice": true}});
    assert_eq!(put_json(&repo, "granary-demo", &star).await.status(), 200);
    // Without -rev a missing version is not an unpublish.
    let mut partial = before.clone();
    partial["versions"] = json!({});
    assert_eq!(
        put_json(&repo, "granary-demo", &partial).await.status(),
        200
    );
    let after = get(&repo, "granary-demo").await.json();
    assert_eq!(after["versions"], before["versions"]);
    // The body's name must match the URL.
    let other = json!({"_id": "other", "name": "other"});
    assert_eq!(put_json(&repo, "granary-demo", &other).await.status(), 400);
    assert_eq!(put_json(&repo, "absent", &star).await.status(), 400);
}

#[tokio::test]
async fn unpublish_one_version_like_the_cli() {
    let repo = registry();
    publish_fixture(&repo, DEMO_1_0_0).await;
    publish_fixture(&repo, DEMO_1_1_0).await;
    let rev = write_doc(&repo, "granary-demo").await["_rev"]
        .as_str()
        .unwrap()
        .to_owned();

    // The captured body: 1.1.0 gone, `next` gone, latest on 1.0.0.
    let body = fixture_json("unpublish-granary-demo-1.1.0.json");
    let put = put_json(&repo, &format!("granary-demo/-rev/{rev}"), &body).await;
    assert_eq!(put.status(), 200, "{:?}", put.body());
    assert_eq!(put.action, Some(Action::Write));
    let rev = write_doc(&repo, "granary-demo").await["_rev"]
        .as_str()
        .unwrap()
        .to_owned();
    let del = send(
        &repo,
        "DELETE",
        &format!("granary-demo/-/granary-demo-1.1.0.tgz/-rev/{rev}"),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(del.status(), 200);
    assert_eq!(del.action, Some(Action::Write));

    let p = get(&repo, "granary-demo").await.json();
    let versions: Vec<&String> = p["versions"].as_object().unwrap().keys().collect();
    assert_eq!(versions, ["1.0.0"]);
    assert_eq!(p["dist-tags"], json!({"latest": "1.0.0"}));
    assert_eq!(
        get(&repo, "granary-demo/-/granary-demo-1.1.0.tgz")
            .await
            .status(),
        404
    );
    // An unpublished version can never be published again.
    let again = send(
        &repo,
        "PUT",
        "granary-demo",
        &[],
        crate::support::fixture(DEMO_1_1_0),
    )
    .await;
    assert_eq!(again.status(), 403);
    assert_eq!(
        again.json()["error"],
        "You cannot publish over the previously published versions: 1.1.0."
    );
}

#[tokio::test]
async fn unpublish_latest_moves_latest() {
    let repo = registry();
    publish_fixture(&repo, DEMO_1_0_0).await;
    publish_fixture(&repo, DEMO_1_1_0).await;
    let tags = "-/package/granary-demo/dist-tags";
    send(&repo, "PUT", &format!("{tags}/latest"), &[], "\"1.1.0\"").await;
    // What libnpmpublish does for `npm unpublish granary-demo@1.1.0`.
    let mut doc: Value = write_doc(&repo, "granary-demo").await;
    let rev = doc["_rev"].as_str().unwrap().to_owned();
    doc["versions"].as_object_mut().unwrap().remove("1.1.0");
    doc["dist-tags"] = json!({"latest": "1.0.0"});
    let put = put_json(&repo, &format!("granary-demo/-rev/{rev}"), &doc).await;
    assert_eq!(put.status(), 200);
    assert_eq!(get(&repo, tags).await.json(), json!({"latest": "1.0.0"}));
}

#[tokio::test]
async fn unpublish_everything() {
    let repo = registry();
    publish_fixture(&repo, DEMO_1_0_0).await;
    publish_fixture(&repo, DEMO_1_1_0).await;
    let rev = write_doc(&repo, "granary-demo").await["_rev"]
        .as_str()
        .unwrap()
        .to_owned();
    let del = send(
        &repo,
        "DELETE",
        &format!("granary-demo/-rev/{rev}"),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(del.status(), 200);
    assert_eq!(del.action, Some(Action::Write));
    assert_eq!(get(&repo, "granary-demo").await.status(), 404);
    assert_eq!(
        get(&repo, "granary-demo/-/granary-demo-1.0.0.tgz")
            .await
            .status(),
        404
    );
    let absent = send(&repo, "DELETE", "absent/-rev/1-x", &[], Bytes::new()).await;
    assert_eq!(absent.status(), 404);
}
