//! Local and live queries through the client: typed pages that concatenate,
//! and a live query that updates on exactly the changes that alter its
//! result (local or remote), once per burst.

use serde::{Deserialize, Serialize};
use tide_client::{QueryUpdate, field};
use tide_transport::FakeServer;

use crate::client;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Task {
    status: String,
    due: u32,
}

fn task(status: &str, due: u32) -> Task {
    Task { status: status.into(), due }
}

fn ids<T>(update: &QueryUpdate<T>) -> Vec<&str> {
    update.docs.iter().map(|(id, _)| id.as_str()).collect()
}

#[tokio::test]
async fn typed_pages_concatenate_to_the_whole_result() {
    let tide = tide_client::Tide::builder().open().await.unwrap();
    let tasks = tide.collection::<Task>("tasks");
    tasks.create_index([field("status"), field("due")]).await.unwrap();
    for i in 0..25u32 {
        tasks.put(&format!("t{i:02}"), &task(if i % 2 == 0 { "open" } else { "done" }, 30 - i)).await.unwrap();
    }
    let open = tasks.query().filter(field("status").eq("open")).order_by_desc(field("due"));
    let whole: Vec<String> =
        open.clone().limit(100).fetch().await.unwrap().docs.into_iter().map(|(id, _)| id).collect();
    assert_eq!(whole.len(), 13);
    assert_eq!(whole.first().map(String::as_str), Some("t00"), "due 30 first");
    let mut paged = Vec::new();
    let mut q = open.clone().limit(4);
    loop {
        let page = q.fetch().await.unwrap();
        paged.extend(page.docs.into_iter().map(|(id, _)| id));
        match page.next {
            // A cursor kept as text works as well.
            Some(next) => q = q.after(next.to_string().parse().unwrap()),
            None => break,
        }
    }
    assert_eq!(paged, whole);
    assert_eq!(open.count().await.unwrap(), 13);
    assert!(open.plan().await.unwrap().iter().any(|l| l.contains("USING INDEX tide_ix_")));
    tide.close().await;
}

#[tokio::test]
async fn a_live_query_updates_on_the_changes_that_alter_it() {
    let server = FakeServer::new();
    let phone = client(&server, "phone").await;
    let laptop = client(&server, "laptop").await;
    let tasks = phone.collection::<Task>("tasks");
    tasks.put("a", &task("open", 3)).await.unwrap();
    tasks.put("b", &task("done", 1)).await.unwrap();
    let mut live =
        tasks.query().filter(field("status").eq("open")).order_by(field("due")).limit(5_000).watch().await.unwrap();
    let first = live.next().await.unwrap().unwrap();
    assert_eq!((ids(&first), first.missed), (vec!["a"], 0), "the result at once");

    // A change that cannot alter it, then one that does: one update, nothing missed.
    tasks.put("b", &task("done", 2)).await.unwrap();
    tasks.put("c", &task("open", 1)).await.unwrap();
    let update = live.next().await.unwrap().unwrap();
    assert_eq!((ids(&update), update.missed), (vec!["c", "a"], 0));

    // A document leaving the result.
    tasks.put("a", &task("done", 3)).await.unwrap();
    let update = live.next().await.unwrap().unwrap();
    assert_eq!((ids(&update), update.missed), (vec!["c"], 0));

    // A remote page of 1,000 changes: one update with all of them.
    let remote = laptop.collection::<Task>("tasks");
    let batch = (0..1_000).fold(tide_client::Batch::default(), |b, i| {
        b.put("tasks", &format!("r{i:04}"), &task("open", 10 + i)).unwrap()
    });
    laptop.commit(batch).await.unwrap();
    laptop.sync_once().await.unwrap();
    assert_eq!(remote.count().await.unwrap(), 1_000);
    phone.sync_once().await.unwrap();
    let update = live.next().await.unwrap().unwrap();
    assert_eq!((update.docs.len(), update.missed), (1_001, 0), "the whole page in one update");
    // And no second one for it: the next update is the next change's.
    tasks.delete("c").await.unwrap();
    let update = live.next().await.unwrap().unwrap();
    assert_eq!((update.docs.len(), update.missed, update.docs[0].0.as_str()), (1_000, 0, "r0000"));

    phone.close().await;
    assert!(live.next().await.is_none(), "it ends with the Tide");
    laptop.close().await;
}
