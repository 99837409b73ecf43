//! Acceptance tests of sluice-dev against the real cluster it starts
//! (kube-apiserver, kubelet, containerd, ... built by dev/scripts/build-cluster.sh).
//! They need root and the cluster binaries, and FAIL (never skip) with the
//! command to run when either is missing. One cluster at a time per host:
//! tests wait for each other on a host lock.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod};
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use sluice_dev::{Cluster, ClusterOptions, image};

async fn start(opts: ClusterOptions) -> Cluster {
    match Cluster::start(opts).await {
        Ok(c) => c,
        Err(e) => panic!(
            "could not start the sluice-dev cluster: {e}\n(build the binaries with `bash dev/scripts/build-cluster.sh` and run the tests as root)"
        ),
    }
}

fn busybox() -> PathBuf {
    image::busybox_image_tar(&sluice_dev::host::cache_root())
        .unwrap_or_else(|e| panic!("building the busybox test image: {e}"))
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn kubectl(c: &Cluster, args: &[&str]) -> Output {
    c.kubectl().args(args).output().unwrap_or_else(|e| panic!("running kubectl {args:?}: {e}"))
}

fn kubectl_ok(c: &Cluster, args: &[&str]) -> String {
    let o = kubectl(c, args);
    assert!(o.status.success(), "kubectl {args:?} failed: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn kubectl_stdin(c: &Cluster, args: &[&str], input: &str) -> Output {
    use std::io::Write;
    let mut child = c
        .kubectl()
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running kubectl {args:?}: {e}"));
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes()).expect("writing kubectl stdin");
    }
    child.wait_with_output().expect("waiting for kubectl")
}

async fn wait_for<F, Fut>(what: &str, timeout: Duration, f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    assert!(poll(timeout, f).await, "timed out waiting for {what}");
}

async fn poll<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    true
}

/// kubectl describe and logs of a pod, for failure messages.
fn diagnose(c: &Cluster, ns: &str, pod: &str) -> String {
    let d = kubectl(c, &["describe", "pod", "-n", ns, pod]);
    let l = kubectl(c, &["logs", "-n", ns, pod]);
    format!("{}\n--- logs ---\n{}", text(&d), text(&l))
}

fn restricted_security() -> serde_json::Value {
    json!({
        "runAsNonRoot": true, "runAsUser": 65534, "runAsGroup": 65534,
        "allowPrivilegeEscalation": false,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    })
}

/// Processes, mounts, links and folders a stopped cluster must not leave.
fn assert_nothing_left(state_dir: &Path, run_dir: &Path) {
    let state = state_dir.display().to_string();
    let mut left = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline"))
            && String::from_utf8_lossy(&cmd).contains(&state)
        {
            left.push(String::from_utf8_lossy(&cmd).replace('\0', " "));
        }
    }
    assert!(left.is_empty(), "processes left behind: {left:#?}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let run = run_dir.display().to_string();
    let stray: Vec<&str> = mounts.lines().filter(|l| l.contains(&state) || l.contains(&run)).collect();
    assert!(stray.is_empty(), "mounts left behind: {stray:#?}");
    assert!(!Path::new("/sys/class/net/sluice0").exists(), "bridge sluice0 left behind");
    assert!(!run_dir.exists(), "{} left behind", run_dir.display());
    for cmd in ["iptables-save", "ip6tables-save"] {
        let out = std::process::Command::new(cmd).output().expect(cmd);
        let rules = String::from_utf8_lossy(&out.stdout);
        let kube: Vec<&str> = rules.lines().filter(|l| l.contains("KUBE-") || l.contains("CNI-")).collect();
        assert!(kube.is_empty(), "{cmd}: chains left behind: {kube:#?}");
    }
}

#[tokio::test]
async fn up_runs_pods_of_a_local_image_with_dns_and_down_leaves_nothing() {
    let t0 = Instant::now();
    let mut cluster = start(ClusterOptions { images: vec![busybox()], ..ClusterOptions::default() }).await;
    let timings = cluster.timings();
    eprintln!("cluster up: {timings:?} (test {:?})", t0.elapsed());

    // kubectl from the pinned build talks to the pinned server.
    let version = kubectl_ok(&cluster, &["version"]);
    assert!(version.contains("Client Version: v1.37.2"), "{version}");
    assert!(version.contains("Server Version: v1.37.2"), "{version}");
    let nodes = kubectl_ok(&cluster, &["get", "nodes", "--no-headers"]);
    assert!(nodes.contains("sluice-dev") && nodes.contains(" Ready "), "{nodes}");

    // A server on the host, reachable from pods by a Service DNS name.
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let server = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 15\r\n\r\nhello from host").await;
        }
    });
    cluster.expose_host_service("default", "host-echo", port).await.expect("expose host service");

    let client = cluster.client().await.expect("client");
    let ns = "restricted";
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": ns, "labels": {
                    "pod-security.kubernetes.io/enforce": "restricted",
                    "pod-security.kubernetes.io/enforce-version": "latest"}},
            }))
            .expect("namespace"),
        )
        .await
        .expect("create namespace");
    sluice_dev::bootstrap::wait_default_service_account(&client, ns, Duration::from_secs(30))
        .await
        .expect("default service account");
    let script = format!(
        "nslookup kubernetes.default.svc.cluster.local && \
         nslookup host-echo.default.svc.cluster.local && \
         printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc host-echo.default.svc.cluster.local {port} && echo && \
         echo ready > /tmp/ready && exec sleep 3600"
    );
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "probe", "namespace": ns},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "main",
                "image": image::BUSYBOX_IMAGE,
                "imagePullPolicy": "Never",
                "command": ["/bin/sh", "-c", script],
                "securityContext": restricted_security(),
                "readinessProbe": {"exec": {"command": ["/bin/cat", "/tmp/ready"]},
                                    "periodSeconds": 1},
                "resources": {"limits": {"memory": "32Mi", "cpu": "100m"}},
            }],
        },
    }))
    .expect("pod");
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    pods.create(&PostParams::default(), &pod).await.expect("a restricted pod is admitted");
    let created = Instant::now();
    let ready = poll(Duration::from_secs(60), || async {
        let p = pods.get("probe").await.ok();
        p.and_then(|p| p.status)
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    })
    .await;
    assert!(ready, "pod probe not Ready:\n{}", diagnose(&cluster, ns, "probe"));
    eprintln!("pod Ready {:?} after creation", created.elapsed());
    let logs = kubectl_ok(&cluster, &["logs", "-n", ns, "probe"]);
    assert!(logs.contains("hello from host"), "{logs}");
    assert!(logs.contains("Address: 10.96.0.1"), "{logs}");
    let exec = kubectl_ok(&cluster, &["exec", "-n", ns, "probe", "--", "/bin/id"]);
    assert!(exec.contains("uid=65534"), "{exec}");

    // A privileged pod is refused in the restricted namespace.
    let mut bad = pod.clone();
    bad.metadata.name = Some("bad".into());
    if let Some(spec) = bad.spec.as_mut() {
        spec.containers[0].security_context = None;
    }
    let err = pods
        .create(&PostParams::default(), &bad)
        .await
        .expect_err("PodSecurity must reject a pod without a restricted securityContext");
    assert!(err.to_string().contains("violates PodSecurity"), "{err}");

    // The audit log shows who did what.
    wait_for("audit record of the pod create", Duration::from_secs(5), || async {
        cluster.audit_records().is_ok_and(|r| {
            r.iter().any(|a| {
                a.user == "sluice-admin"
                    && a.verb == "create"
                    && a.resource == "pods"
                    && a.namespace == ns
                    && a.code == 201
            })
        })
    })
    .await;

    server.abort();
    let state_dir = cluster.config().state_dir.clone();
    let run_dir = cluster.config().run_dir.clone();
    let t_down = Instant::now();
    cluster.stop();
    eprintln!("down in {:?}", t_down.elapsed());
    assert_nothing_left(&state_dir, &run_dir);
}

const CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.test.sluice.io
spec:
  group: test.sluice.io
  names: {kind: Widget, plural: widgets, singular: widget, shortNames: [wg]}
  scope: Namespaced
  versions:
    - name: v1
      served: true
      storage: true
      subresources:
        status: {}
        scale:
          specReplicasPath: .spec.replicas
          statusReplicasPath: .status.replicas
      additionalPrinterColumns:
        - {name: Size, type: string, jsonPath: .spec.size}
        - {name: Desired, type: integer, jsonPath: .spec.replicas}
        - {name: Phase, type: string, jsonPath: .status.phase}
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              x-kubernetes-validations:
                - rule: "self.minReplicas <= self.replicas"
                  message: "replicas must be at least minReplicas"
                  fieldPath: ".replicas"
              properties:
                size: {type: string, enum: [small, large]}
                replicas: {type: integer, minimum: 0}
                minReplicas: {type: integer, minimum: 0}
            status:
              type: object
              properties:
                phase: {type: string}
                replicas: {type: integer}
"#;

#[tokio::test]
async fn kubectl_drives_a_custom_resource_end_to_end() {
    let cluster = start(ClusterOptions::default()).await;
    let o = kubectl_stdin(&cluster, &["apply", "-f", "-"], CRD);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("customresourcedefinition.apiextensions.k8s.io/widgets.test.sluice.io created"));
    kubectl_ok(&cluster, &["wait", "--for=condition=Established", "crd/widgets.test.sluice.io", "--timeout=30s"]);
    let widget = "apiVersion: test.sluice.io/v1\nkind: Widget\nmetadata: {name: w1, namespace: default}\nspec: {size: small, replicas: 2, minReplicas: 1}\n";
    let o = kubectl_stdin(&cluster, &["apply", "-f", "-"], widget);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("widget.test.sluice.io/w1 created"), "{}", text(&o));

    let get = kubectl_ok(&cluster, &["get", "wg", "w1"]);
    let header: Vec<&str> = get.lines().next().unwrap_or_default().split_whitespace().collect();
    assert_eq!(header, vec!["NAME", "SIZE", "DESIRED", "PHASE"], "{get}");
    assert!(get.lines().nth(1).unwrap_or_default().starts_with("w1"), "{get}");

    let scaled = kubectl_ok(&cluster, &["scale", "widget/w1", "--replicas=5"]);
    assert!(scaled.contains("widget.test.sluice.io/w1 scaled"), "{scaled}");
    let replicas = kubectl_ok(&cluster, &["get", "widget", "w1", "-o", "jsonpath={.spec.replicas}"]);
    assert_eq!(replicas, "5");

    let patched = kubectl_ok(
        &cluster,
        &[
            "patch",
            "widget",
            "w1",
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"phase":"Running","replicas":5}}"#,
        ],
    );
    assert!(patched.contains("widget.test.sluice.io/w1 patched"), "{patched}");
    let get = kubectl_ok(&cluster, &["get", "widget", "w1", "--no-headers"]);
    let cols: Vec<&str> = get.split_whitespace().collect();
    assert_eq!(&cols[..4], &["w1", "small", "5", "Running"], "{get}");

    // CEL rule with its field path in kubectl's message.
    let bad = "apiVersion: test.sluice.io/v1\nkind: Widget\nmetadata: {name: w2, namespace: default}\nspec: {size: small, replicas: 1, minReplicas: 3}\n";
    let o = kubectl_stdin(&cluster, &["apply", "-f", "-"], bad);
    assert!(!o.status.success());
    let msg = text(&o);
    assert!(msg.contains("spec.replicas: Invalid value"), "{msg}");
    assert!(msg.contains("replicas must be at least minReplicas"), "{msg}");
    let bad_enum = "apiVersion: test.sluice.io/v1\nkind: Widget\nmetadata: {name: w3, namespace: default}\nspec: {size: huge, replicas: 1, minReplicas: 0}\n";
    let o = kubectl_stdin(&cluster, &["apply", "-f", "-"], bad_enum);
    assert!(!o.status.success());
    assert!(text(&o).contains("spec.size: Unsupported value: \"huge\""), "{}", text(&o));

    // delete cascades to owned objects (the garbage collector of the real
    // controller-manager).
    let uid = kubectl_ok(&cluster, &["get", "widget", "w1", "-o", "jsonpath={.metadata.uid}"]);
    let client = cluster.client().await.expect("client");
    let cms = Api::<ConfigMap>::namespaced(client.clone(), "default");
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "metadata": {"name": "w1-child", "ownerReferences": [{
                "apiVersion": "test.sluice.io/v1", "kind": "Widget", "name": "w1", "uid": uid,
                "controller": true, "blockOwnerDeletion": true}]},
            "data": {"k": "v"},
        }))
        .expect("configmap"),
    )
    .await
    .expect("create owned configmap");
    let deleted = kubectl_ok(&cluster, &["delete", "widget", "w1"]);
    assert!(deleted.contains("widget.test.sluice.io \"w1\" deleted"), "{deleted}");
    // The garbage collector picks up a new resource type on its 30 s
    // discovery resync, so for a CRD created just now it may take that long.
    wait_for("owned ConfigMap garbage-collected", Duration::from_secs(90), || async {
        matches!(cms.get_opt("w1-child").await, Ok(None))
    })
    .await;
}

#[tokio::test]
async fn server_side_apply_is_idempotent_and_detects_conflicts() {
    let cluster = start(ClusterOptions::default()).await;
    let client = cluster.client().await.expect("client");
    let cms = Api::<ConfigMap>::namespaced(client, "default");
    let body = json!({"apiVersion": "v1", "kind": "ConfigMap",
                      "metadata": {"name": "ssa"}, "data": {"a": "1"}});
    let first = cms.patch("ssa", &PatchParams::apply("manager-a"), &Patch::Apply(&body)).await.expect("first apply");
    let second = cms.patch("ssa", &PatchParams::apply("manager-a"), &Patch::Apply(&body)).await.expect("second apply");
    assert_eq!(
        first.metadata.resource_version, second.metadata.resource_version,
        "applying the same object twice with one manager must not write"
    );
    let other = json!({"apiVersion": "v1", "kind": "ConfigMap",
                       "metadata": {"name": "ssa"}, "data": {"a": "2"}});
    let err = cms
        .patch("ssa", &PatchParams::apply("manager-b"), &Patch::Apply(&other))
        .await
        .expect_err("a second manager changing an owned field must conflict");
    match err {
        kube::Error::Api(s) => assert_eq!(s.code, 409, "{s:?}"),
        e => panic!("expected a 409 conflict, got {e}"),
    }
    let forced =
        cms.patch("ssa", &PatchParams::apply("manager-b").force(), &Patch::Apply(&other)).await.expect("forced apply");
    assert_eq!(forced.data.and_then(|d| d.get("a").cloned()).as_deref(), Some("2"));
    cms.delete("ssa", &DeleteParams::default()).await.expect("delete");
}

#[tokio::test]
async fn virtual_nodes_run_pods_without_containers() {
    let cluster = start(ClusterOptions { virtual_nodes: 4, ..ClusterOptions::default() }).await;
    let out = kubectl_ok(&cluster, &["get", "nodes", "-l", "type=kwok", "--no-headers"]);
    assert_eq!(out.lines().count(), 4, "{out}");
    let deployment = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: fake, namespace: default}
spec:
  replicas: 40
  selector: {matchLabels: {app: fake}}
  template:
    metadata: {labels: {app: fake}}
    spec:
      nodeSelector: {type: kwok}
      tolerations: [{key: kwok.x-k8s.io/node, operator: Exists, effect: NoSchedule}]
      containers: [{name: c, image: fake-image}]
"#;
    let o = kubectl_stdin(&cluster, &["apply", "-f", "-"], deployment);
    assert!(o.status.success(), "{}", text(&o));
    let t0 = Instant::now();
    let client = cluster.client().await.expect("client");
    let pods = Api::<Pod>::namespaced(client, "default");
    wait_for("40 pods Running on KWOK nodes", Duration::from_secs(90), || async {
        pods.list(&kube::api::ListParams::default().labels("app=fake"))
            .await
            .map(|l| {
                l.items.iter().filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")).count()
                    == 40
            })
            .unwrap_or(false)
    })
    .await;
    eprintln!("40 KWOK pods Running after {:?}", t0.elapsed());
    let real = kubectl_ok(
        &cluster,
        &["get", "pods", "-o", "wide", "--field-selector", "spec.nodeName=sluice-dev", "--no-headers"],
    );
    assert!(!real.contains("fake-"), "no fake pod on the real node: {real}");
}

/// The e2e probe image: the project's runtime base (mmdebstrap + buildah via
/// `sluice-dev image`'s path) with busybox and the pinned kubectl, so a pod can
/// talk to the API with its ServiceAccount token.
fn probe_image() -> PathBuf {
    let cache = sluice_dev::host::cache_root();
    let ctx = cache.join("e2e-probe-context");
    let bin = ctx.join("bin");
    std::fs::create_dir_all(&bin).expect("context folder");
    let kubectl = sluice_dev::host::default_bin_dir().join("kubectl");
    for (src, name) in [(Path::new("/bin/busybox"), "busybox"), (kubectl.as_path(), "kubectl")] {
        let dst = bin.join(name);
        let same =
            std::fs::metadata(&dst).and_then(|d| std::fs::metadata(src).map(|s| s.len() == d.len())).unwrap_or(false);
        if !same {
            std::fs::copy(src, &dst).unwrap_or_else(|e| panic!("copying {}: {e}", src.display()));
        }
    }
    for applet in ["sh", "nc", "cat", "sleep", "printf", "id", "touch", "echo"] {
        let link = bin.join(applet);
        if !link.exists() {
            std::os::unix::fs::symlink("busybox", &link).expect("symlink");
        }
    }
    let dockerfile = ctx.join("Dockerfile");
    std::fs::write(
        &dockerfile,
        "ARG RUNTIME_IMAGE=debian:bookworm-slim\n\
         FROM ${RUNTIME_IMAGE}\n\
         COPY bin/ /usr/local/bin/\n\
         USER 65532:65532\n\
         ENTRYPOINT [\"/usr/local/bin/sh\"]\n",
    )
    .expect("Dockerfile");
    image::build(
        &image::ImageSpec { dockerfile, context: ctx, target: None, name: PROBE_IMAGE.into(), build_args: Vec::new() },
        &cache,
    )
    .unwrap_or_else(|e| panic!("building the probe image: {e}"))
}

const PROBE_IMAGE: &str = "localhost/sluice-e2e/probe:1";

/// A host TCP server that records what it receives and answers "hello from host".
async fn recording_server() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let seen = seen2.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or(0);
                if let Ok(mut v) = seen.lock() {
                    v.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                }
                let _ = s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 15\r\n\r\nhello from host").await;
            });
        }
    });
    (port, seen)
}

#[tokio::test]
async fn a_deployment_runs_restricted_with_config_api_access_and_graceful_stop() {
    let mut cluster = start(ClusterOptions { images: vec![probe_image()], ..ClusterOptions::default() }).await;
    let (port, seen) = recording_server().await;
    cluster.expose_host_service("default", "host-echo", port).await.expect("expose host service");
    let ns = "apps";
    let manifest = format!(
        r#"
apiVersion: v1
kind: Namespace
metadata:
  name: {ns}
  labels: {{pod-security.kubernetes.io/enforce: restricted}}
---
apiVersion: v1
kind: Secret
metadata: {{name: creds, namespace: {ns}}}
stringData: {{password: s3cret}}
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: app, namespace: {ns}}}
data:
  greeting: hello-from-configmap
  app.conf: "mode=test"
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: probe, namespace: {ns}}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: read-configmaps, namespace: {ns}}}
rules: [{{apiGroups: [""], resources: [configmaps], verbs: [get, list]}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: probe, namespace: {ns}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: read-configmaps}}
subjects: [{{kind: ServiceAccount, name: probe, namespace: {ns}}}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: probe, namespace: {ns}}}
spec:
  replicas: 2
  selector: {{matchLabels: {{app: probe}}}}
  template:
    metadata: {{labels: {{app: probe}}}}
    spec:
      serviceAccountName: probe
      terminationGracePeriodSeconds: 10
      securityContext: {{runAsNonRoot: true, seccompProfile: {{type: RuntimeDefault}}}}
      volumes: [{{name: config, configMap: {{name: app}}}}]
      containers:
        - name: probe
          image: {PROBE_IMAGE}
          imagePullPolicy: Never
          env:
            - {{name: POD_NAME, valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}}}
            - {{name: MEM_LIMIT, valueFrom: {{resourceFieldRef: {{resource: limits.memory}}}}}}
            - {{name: PASSWORD, valueFrom: {{secretKeyRef: {{name: creds, key: password}}}}}}
          volumeMounts: [{{name: config, mountPath: /config}}]
          resources: {{limits: {{memory: 64Mi, cpu: 200m}}, requests: {{memory: 32Mi, cpu: 50m}}}}
          securityContext:
            allowPrivilegeEscalation: false
            capabilities: {{drop: [ALL]}}
          readinessProbe:
            exec: {{command: [cat, /tmp/ready]}}
            periodSeconds: 1
          command: [sh, -c]
          args:
            - |
              trap 'printf "SIGTERM from %s\n" "$POD_NAME" | nc host-echo.default.svc.cluster.local {port}; exit 0' TERM
              echo "pod=$POD_NAME password=$PASSWORD memlimit=$MEM_LIMIT"
              echo "config: $(cat /config/app.conf)"
              echo "cgroup memory: $(cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max)"
              echo "api get: $(kubectl get configmap app -o 'jsonpath={{.data.greeting}}' 2>&1)"
              echo "api delete: $(kubectl delete configmap app 2>&1)"
              printf "GET / HTTP/1.0\r\n\r\n" | nc host-echo.default.svc.cluster.local {port}
              echo
              touch /tmp/ready
              while true; do sleep 1 & wait $!; done
"#
    );
    let o = kubectl_stdin(&cluster, &["apply", "-f", "-"], &manifest);
    assert!(o.status.success(), "{}", text(&o));
    let client = cluster.client().await.expect("client");
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    let ready = poll(Duration::from_secs(90), || async {
        let Ok(list) = pods.list(&kube::api::ListParams::default().labels("app=probe")).await else {
            return false;
        };
        list.items.len() == 2
            && list.items.iter().all(|p| {
                p.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
    })
    .await;
    let out = kubectl(&cluster, &["get", "pods", "-n", ns, "-o", "wide"]);
    assert!(ready, "probe pods not Ready:\n{}\n{}", text(&out), kubectl_ok(&cluster, &["describe", "pods", "-n", ns]));

    let list = pods.list(&kube::api::ListParams::default().labels("app=probe")).await.expect("list");
    let names: Vec<String> = list.items.iter().filter_map(|p| p.metadata.name.clone()).collect();
    for name in &names {
        let logs = kubectl_ok(&cluster, &["logs", "-n", ns, name]);
        assert!(logs.contains(&format!("pod={name} password=s3cret memlimit=67108864")), "{logs}");
        assert!(logs.contains("config: mode=test"), "{logs}");
        assert!(logs.contains("cgroup memory: 67108864"), "{logs}");
        assert!(logs.contains("api get: hello-from-configmap"), "{logs}");
        assert!(
            logs.contains("api delete: Error from server (Forbidden)")
                && logs.contains("cannot delete resource \"configmaps\""),
            "{logs}"
        );
        assert!(logs.contains("hello from host"), "{logs}");
    }
    let id = kubectl_ok(&cluster, &["exec", "-n", ns, &names[0], "--", "id"]);
    assert!(id.contains("uid=65532"), "{id}");

    // The 403 is in the audit log under the pod's ServiceAccount.
    wait_for("audit record of the forbidden delete", Duration::from_secs(5), || async {
        cluster.audit_records().is_ok_and(|r| {
            r.iter().any(|a| {
                a.user == format!("system:serviceaccount:{ns}:probe")
                    && a.verb == "delete"
                    && a.resource == "configmaps"
                    && a.namespace == ns
                    && a.code == 403
            })
        })
    })
    .await;

    // Scale down: the removed pod gets SIGTERM and says so to the host server.
    kubectl_ok(&cluster, &["scale", "-n", ns, "deployment/probe", "--replicas=1"]);
    wait_for("SIGTERM reported by the removed pod", Duration::from_secs(30), || async {
        seen.lock().is_ok_and(|v| v.iter().any(|m| m.starts_with("SIGTERM from probe-")))
    })
    .await;

    // The kube-apiserver restarts and the node and clients carry on.
    let apiserver = cluster.stop_component("kube-apiserver").expect("stop apiserver");
    cluster.start_component(apiserver).await.expect("restart apiserver");
    let nodes = kubectl_ok(&cluster, &["get", "nodes", "--no-headers"]);
    assert!(nodes.contains(" Ready "), "{nodes}");
    cluster.stop();
}

/// The repository root (tests/ is one of its members).
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

/// `sluice:<appVersion>`: the image the chart refers to.
fn chart_image() -> String {
    let chart = std::fs::read_to_string(repo_root().join("charts/sluice/Chart.yaml")).expect("Chart.yaml");
    let version = chart
        .lines()
        .find_map(|l| l.strip_prefix("appVersion:"))
        .map(|v| v.trim().trim_matches('"').to_string())
        .expect("appVersion in Chart.yaml");
    format!("sluice:{version}")
}

/// The cargo target's release folder, next to this test binary's profile.
fn release_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // <target>/<profile>/deps/cluster-<hash>
    exe.ancestors().nth(3).expect("target dir").join("release")
}

#[tokio::test]
async fn the_project_image_runs_in_a_restricted_namespace() {
    let name = chart_image();
    let tar = image::project_image_tar(&repo_root(), &release_dir(), &name, &sluice_dev::host::cache_root())
        .unwrap_or_else(|e| panic!("building the project image {name}: {e}"));
    let cluster = start(ClusterOptions { images: vec![tar], ..ClusterOptions::default() }).await;
    let ns = "project";
    let manifest = format!(
        r#"
apiVersion: v1
kind: Namespace
metadata:
  name: {ns}
  labels: {{pod-security.kubernetes.io/enforce: restricted}}
---
apiVersion: v1
kind: Pod
metadata: {{name: crd, namespace: {ns}}}
spec:
  restartPolicy: Never
  securityContext: {{runAsNonRoot: true, seccompProfile: {{type: RuntimeDefault}}}}
  containers:
    - name: operator
      image: {name}
      imagePullPolicy: IfNotPresent
      args: [crd]
      resources: {{limits: {{memory: 64Mi, cpu: 200m}}}}
      securityContext: {{allowPrivilegeEscalation: false, capabilities: {{drop: [ALL]}}}}
    - name: worker
      image: {name}
      imagePullPolicy: IfNotPresent
      command: [/usr/local/bin/sluice-worker, --version]
      resources: {{limits: {{memory: 64Mi, cpu: 200m}}}}
      securityContext: {{allowPrivilegeEscalation: false, capabilities: {{drop: [ALL]}}}}
"#
    );
    let o = kubectl_stdin(&cluster, &["apply", "-f", "-"], &manifest);
    assert!(o.status.success(), "{}", text(&o));
    let client = cluster.client().await.expect("client");
    let pods = Api::<Pod>::namespaced(client, ns);
    let done = poll(Duration::from_secs(60), || async {
        pods.get("crd").await.ok().and_then(|p| p.status).and_then(|s| s.phase).as_deref() == Some("Succeeded")
    })
    .await;
    assert!(done, "pod of {name} did not succeed:\n{}", diagnose(&cluster, ns, "crd"));
    let crd = kubectl_ok(&cluster, &["logs", "-n", ns, "crd", "-c", "operator"]);
    assert!(crd.contains("kind: CustomResourceDefinition") && crd.contains("streamprocessors.sluice.io"), "{crd}");
    let version = kubectl_ok(&cluster, &["logs", "-n", ns, "crd", "-c", "worker"]);
    assert!(version.contains("sluice-worker"), "{version}");
}

#[tokio::test]
async fn helm_installs_the_chart_and_the_operator_takes_the_lease() {
    let name = chart_image();
    let tar = image::project_image_tar(&repo_root(), &release_dir(), &name, &sluice_dev::host::cache_root())
        .unwrap_or_else(|e| panic!("building the project image {name}: {e}"));
    let cluster = start(ClusterOptions { images: vec![tar], ..ClusterOptions::default() }).await;
    let ns = "sluice-system";
    kubectl_ok(&cluster, &["create", "namespace", ns]);
    kubectl_ok(&cluster, &["label", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted"]);
    let chart = repo_root().join("charts/sluice");
    let chart = chart.to_str().expect("chart path");
    let o = cluster
        .helm()
        .args(["install", "sluice", chart, "-n", ns, "--wait", "--timeout", "120s"])
        .output()
        .expect("running helm");
    assert!(
        o.status.success(),
        "helm install failed: {}\n{}",
        text(&o),
        text(&kubectl(&cluster, &["describe", "pods", "-n", ns]))
    );
    let sa = format!("system:serviceaccount:{ns}:");
    wait_for("the operator to take its Lease", Duration::from_secs(30), || async {
        cluster.audit_records().is_ok_and(|r| {
            r.iter().any(|a| {
                a.user.starts_with(&sa)
                    && a.resource == "leases"
                    && (a.code == 200 || a.code == 201)
                    && (a.verb == "create" || a.verb == "patch" || a.verb == "update")
            })
        })
    })
    .await;
    let denied: Vec<_> = cluster
        .audit_records()
        .expect("audit log")
        .into_iter()
        .filter(|a| a.user.starts_with(&sa) && a.code == 403)
        .collect();
    assert!(denied.is_empty(), "the chart's RBAC denied the operator: {denied:#?}");
    let o = cluster.helm().args(["uninstall", "sluice", "-n", ns, "--wait"]).output().expect("running helm");
    assert!(o.status.success(), "helm uninstall failed: {}", text(&o));
}
