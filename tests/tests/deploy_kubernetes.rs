#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The Kubernetes manifests under `deploy/kubernetes/`: every file parses as YAML, every
//! object has `apiVersion`, `kind` and `metadata.name`, `kustomization.yaml` lists every
//! manifest, the objects the pods reference exist (or are the documented bootstrap objects),
//! the embedded `server.toml` and `agent.toml` are accepted by the real configuration
//! loaders, and the structure the deployment depends on holds: the server is a one-replica
//! StatefulSet with a volume claim for `data_dir`, the agent is a hostPID DaemonSet whose
//! Workload API socket is inside a hostPath mount and which attests with a projected
//! service-account token the server's `k8s_psat` cluster accepts, and no container can
//! escalate privileges.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize as _;
use serde_yaml_ng::Value;

/// Objects the manifests reference but bootstrap creates (deploy/kubernetes/README.md), or
/// that Kubernetes itself puts in every namespace (`kube-root-ca.crt`, the cluster's CA).
const BOOTSTRAP_OBJECTS: &[(&str, &str)] = &[("ConfigMap", "tessera-bundle"), ("ConfigMap", "kube-root-ca.crt")];

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes")
}

fn manifest_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir())
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .filter(|path| path.file_name().unwrap() != "kustomization.yaml")
        .collect();
    files.sort();
    assert!(files.len() >= 6, "manifests missing: {files:?}");
    files
}

/// Every document of every manifest, with the file it came from.
fn objects() -> Vec<(String, Value)> {
    let mut objects = Vec::new();
    for file in manifest_files() {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&file).unwrap();
        for document in serde_yaml_ng::Deserializer::from_str(&text) {
            let value = Value::deserialize(document).unwrap_or_else(|err| panic!("{name}: invalid YAML: {err}"));
            if !value.is_null() {
                objects.push((name.clone(), value));
            }
        }
    }
    objects
}

fn str_at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(value, |value, key| value.get(*key)).and_then(Value::as_str)
}

fn find<'a>(objects: &'a [(String, Value)], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .map(|(_, object)| object)
        .find(|object| object["kind"].as_str() == Some(kind) && str_at(object, &["metadata", "name"]) == Some(name))
        .unwrap_or_else(|| panic!("no {kind} {name:?} in deploy/kubernetes"))
}

fn containers(workload: &Value) -> &Vec<Value> {
    workload["spec"]["template"]["spec"]["containers"].as_sequence().unwrap()
}

fn volumes(workload: &Value) -> &Vec<Value> {
    workload["spec"]["template"]["spec"]["volumes"].as_sequence().unwrap()
}

fn volume<'a>(workload: &'a Value, name: &str) -> &'a Value {
    volumes(workload).iter().find(|v| v["name"].as_str() == Some(name)).unwrap_or_else(|| panic!("no volume {name}"))
}

/// The volume mounted at the longest mount path that contains `path`.
fn mount_containing<'a>(container: &'a Value, path: &Path) -> &'a Value {
    container["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter(|mount| path.starts_with(mount["mountPath"].as_str().unwrap()))
        .max_by_key(|mount| mount["mountPath"].as_str().unwrap().len())
        .unwrap_or_else(|| panic!("{} is on no volume of {}", path.display(), container["name"].as_str().unwrap()))
}

#[test]
fn every_manifest_parses_and_names_its_objects() {
    let objects = objects();
    let mut seen = BTreeSet::new();
    for (file, object) in &objects {
        let api_version = object["apiVersion"].as_str().unwrap_or_else(|| panic!("{file}: no apiVersion"));
        assert!(!api_version.is_empty(), "{file}: empty apiVersion");
        let kind = object["kind"].as_str().unwrap_or_else(|| panic!("{file}: no kind"));
        let name = str_at(object, &["metadata", "name"]).unwrap_or_else(|| panic!("{file}: {kind} without a name"));
        let namespace = str_at(object, &["metadata", "namespace"]);
        if kind != "Namespace" {
            assert_eq!(namespace, Some("tessera"), "{file}: {kind} {name} must be in namespace tessera");
        }
        assert!(seen.insert((kind.to_owned(), name.to_owned())), "{file}: {kind} {name} defined twice");
        assert_eq!(str_at(object, &["metadata", "labels", "app.kubernetes.io/part-of"]), Some("tessera"), "{file}");
    }
    for kind in
        ["Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "StatefulSet", "Service", "DaemonSet"]
    {
        assert!(seen.iter().any(|(k, _)| k == kind), "no {kind} in deploy/kubernetes");
    }
}

#[test]
fn kustomization_lists_every_manifest() {
    let text = std::fs::read_to_string(dir().join("kustomization.yaml")).unwrap();
    let kustomization: Value = serde_yaml_ng::from_str(&text).unwrap();
    let listed: BTreeSet<&str> =
        kustomization["resources"].as_sequence().unwrap().iter().map(|r| r.as_str().unwrap()).collect();
    let files: Vec<String> =
        manifest_files().iter().map(|f| f.file_name().unwrap().to_string_lossy().into_owned()).collect();
    let on_disk: BTreeSet<&str> = files.iter().map(String::as_str).collect();
    assert_eq!(listed, on_disk);
}

#[test]
fn pods_reference_only_objects_that_exist_or_that_bootstrap_creates() {
    let objects = objects();
    let readme = std::fs::read_to_string(dir().join("README.md")).unwrap();
    for (kind, name) in BOOTSTRAP_OBJECTS {
        assert!(readme.contains(name), "README.md must explain how to create {kind} {name}");
    }
    let exists = |kind: &str, name: &str| {
        BOOTSTRAP_OBJECTS.contains(&(kind, name))
            || objects
                .iter()
                .any(|(_, o)| o["kind"].as_str() == Some(kind) && str_at(o, &["metadata", "name"]) == Some(name))
    };
    for (file, object) in &objects {
        let Some(pod) = object.get("spec").and_then(|s| s.get("template")).and_then(|t| t.get("spec")) else {
            continue;
        };
        let account = pod["serviceAccountName"].as_str().unwrap_or_else(|| panic!("{file}: no serviceAccountName"));
        assert!(exists("ServiceAccount", account), "{file}: ServiceAccount {account} missing");
        assert_eq!(pod["automountServiceAccountToken"].as_bool(), Some(false), "{file}: no API token is needed");
        for volume in volumes(object) {
            if let Some(name) = str_at(volume, &["configMap", "name"]) {
                assert!(exists("ConfigMap", name), "{file}: ConfigMap {name} missing");
            }
            if let Some(name) = str_at(volume, &["secret", "secretName"]) {
                assert!(exists("Secret", name), "{file}: Secret {name} missing");
            }
        }
        let claims: Vec<&str> = object["spec"]
            .get("volumeClaimTemplates")
            .and_then(Value::as_sequence)
            .map(|claims| claims.iter().map(|c| str_at(c, &["metadata", "name"]).unwrap()).collect())
            .unwrap_or_default();
        for container in containers(object) {
            for mount in container["volumeMounts"].as_sequence().unwrap() {
                let name = mount["name"].as_str().unwrap();
                assert!(
                    volumes(object).iter().any(|v| v["name"].as_str() == Some(name)) || claims.contains(&name),
                    "{file}: mount {name} has no volume"
                );
            }
            let security = &container["securityContext"];
            assert_eq!(security["allowPrivilegeEscalation"].as_bool(), Some(false), "{file}");
            assert_eq!(security["readOnlyRootFilesystem"].as_bool(), Some(true), "{file}");
            let dropped = security["capabilities"]["drop"].as_sequence().unwrap();
            assert!(dropped.iter().any(|c| c.as_str() == Some("ALL")), "{file}: capabilities not dropped");
        }
        let selector = &object["spec"]["selector"]["matchLabels"];
        for (key, value) in selector.as_mapping().unwrap() {
            assert_eq!(&object["spec"]["template"]["metadata"]["labels"][key.as_str().unwrap()], value, "{file}");
        }
    }
    // Services select the server's pods and target named ports the container declares.
    let server = find(&objects, "StatefulSet", "tessera-server");
    let ports: Vec<&str> =
        containers(server)[0]["ports"].as_sequence().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    for name in ["tessera-server", "tessera-server-headless"] {
        let service = find(&objects, "Service", name);
        let label = &server["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"];
        assert_eq!(&service["spec"]["selector"]["app.kubernetes.io/name"], label, "Service {name}");
        assert_eq!(service["spec"]["selector"].as_mapping().unwrap().len(), 1, "Service {name}");
        for port in service["spec"]["ports"].as_sequence().unwrap() {
            assert!(ports.contains(&port["targetPort"].as_str().unwrap()), "Service {name}: unknown target port");
        }
    }
    assert_eq!(server["spec"]["serviceName"].as_str(), Some("tessera-server-headless"));
}

#[test]
fn the_server_is_one_replica_with_its_data_dir_on_a_volume_claim() {
    let objects = objects();
    let server = find(&objects, "StatefulSet", "tessera-server");
    assert_eq!(server["spec"]["replicas"].as_u64(), Some(1), "the sled datastore has a single writer");
    let config_text = find(&objects, "ConfigMap", "tessera-server")["data"]["server.toml"].as_str().unwrap();
    let config = tessera_server::config::parse(config_text, Path::new("server-configmap.yaml")).unwrap();
    let container = &containers(server)[0];
    let data = mount_containing(container, &config.data_dir);
    let claims = server["spec"]["volumeClaimTemplates"].as_sequence().unwrap();
    assert!(
        claims.iter().any(|c| str_at(c, &["metadata", "name"]) == data["name"].as_str()),
        "data_dir {} must be on the volume claim, not {data:?}",
        config.data_dir.display()
    );
    let socket_volume = mount_containing(container, &config.admin_socket)["name"].as_str().unwrap();
    assert!(volume(server, socket_volume).get("emptyDir").is_some(), "the admin socket needs a writable directory");
    let pod = &server["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    assert!(container["securityContext"]["capabilities"].get("add").is_none(), "the server needs no capability");
    // The probes use the health endpoints the configuration enables.
    let health = config.health.bind_address.expect("health endpoints are configured");
    let declared = container["ports"].as_sequence().unwrap();
    let port = declared.iter().find(|p| p["name"].as_str() == Some("health")).unwrap();
    assert_eq!(port["containerPort"].as_u64(), Some(u64::from(health.port())));
    let agent_api = declared.iter().find(|p| p["name"].as_str() == Some("agent-api")).unwrap();
    assert_eq!(agent_api["containerPort"].as_u64(), Some(u64::from(config.bind_address.port())));
    assert_eq!(container["readinessProbe"]["httpGet"]["path"].as_str(), Some("/ready"));
    assert_eq!(container["livenessProbe"]["httpGet"]["path"].as_str(), Some("/live"));
}

#[test]
fn the_agent_is_a_host_pid_daemonset_serving_its_socket_through_a_host_path() {
    let objects = objects();
    let agent = find(&objects, "DaemonSet", "tessera-agent");
    let pod = &agent["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"].as_bool(), Some(true), "attestation reads /proc/<pid> of other pods' processes");
    let data = &find(&objects, "ConfigMap", "tessera-agent")["data"];
    let config = tessera_agent::config::parse(data["agent.toml"].as_str().unwrap(), Path::new("agent.toml")).unwrap();
    let container = &containers(agent)[0];

    let socket_mount = mount_containing(container, &config.socket_path);
    let host_path = str_at(volume(agent, socket_mount["name"].as_str().unwrap()), &["hostPath", "path"])
        .expect("the Workload API socket must be on a hostPath volume");
    assert_eq!(
        Path::new(host_path),
        config.socket_path.parent().unwrap(),
        "workloads mount the host directory the socket is in"
    );
    assert_ne!(socket_mount["readOnly"].as_bool(), Some(true), "the agent creates its socket there");
    let data_mount = mount_containing(container, &config.data_dir);
    assert!(
        volume(agent, data_mount["name"].as_str().unwrap()).get("hostPath").is_some(),
        "the agent SVID must survive pod restarts"
    );
    let admin_mount = mount_containing(container, &config.admin_socket);
    assert_ne!(admin_mount["name"], socket_mount["name"], "the admin socket must not be exposed to workloads");
    let bundle = config.trust_bundle_path.as_deref().expect("trust_bundle_path is set");
    let bundle_volume = volume(agent, mount_containing(container, bundle)["name"].as_str().unwrap());
    assert_eq!(str_at(bundle_volume, &["configMap", "name"]), Some("tessera-bundle"));

    // The agent runs on the ConfigMap's configuration, as PID 1 (for SIGTERM).
    let config_mount = mount_containing(container, Path::new("/etc/tessera/agent/agent.toml"));
    assert_eq!(
        str_at(volume(agent, config_mount["name"].as_str().unwrap()), &["configMap", "name"]),
        Some("tessera-agent")
    );
    let command: Vec<&str> = container["command"]
        .as_sequence()
        .into_iter()
        .chain(container["args"].as_sequence())
        .flatten()
        .map(|arg| arg.as_str().unwrap())
        .collect();
    assert_eq!(command, ["/usr/bin/tessera-agent", "run", "--config", "/etc/tessera/agent/agent.toml"]);
    let socket = config.socket_path.to_str().unwrap();
    for probe in ["readinessProbe", "livenessProbe"] {
        let command = container[probe]["exec"]["command"].as_sequence().unwrap();
        assert!(command.iter().any(|arg| arg.as_str() == Some(socket)), "{probe} must check {socket}");
    }

    let security = &container["securityContext"];
    let added: BTreeSet<&str> =
        security["capabilities"]["add"].as_sequence().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    assert_eq!(added, BTreeSet::from(["SYS_PTRACE", "DAC_READ_SEARCH"]), "exactly what /proc attestation needs");
    assert_ne!(security["privileged"].as_bool(), Some(true));
}

#[test]
fn agents_attest_with_a_projected_token_the_server_accepts() {
    let objects = objects();
    let server_text = find(&objects, "ConfigMap", "tessera-server")["data"]["server.toml"].as_str().unwrap();
    let server_config = tessera_server::config::parse(server_text, Path::new("server-configmap.yaml")).unwrap();
    let clusters =
        &server_config.node_attestor.k8s_psat.as_ref().expect("the server trusts a k8s_psat cluster").cluster;
    assert_eq!(clusters.len(), 1);
    let cluster = &clusters[0];
    let agent_text = find(&objects, "ConfigMap", "tessera-agent")["data"]["agent.toml"].as_str().unwrap();
    let agent_config = tessera_agent::config::parse(agent_text, Path::new("agent-configmap.yaml")).unwrap();
    assert_eq!(agent_config.join_token, None);
    assert_eq!(agent_config.trust_domain, server_config.trust_domain);
    let token_path = &agent_config.node_attestor.k8s_psat.as_ref().expect("the agent attests with k8s_psat").token_path;

    // The token file is a projected service-account token for the cluster's audience, no
    // longer-lived than the server accepts (and at least Kubernetes' minimum of 10 minutes).
    let agent = find(&objects, "DaemonSet", "tessera-agent");
    let container = &containers(agent)[0];
    let mount = mount_containing(container, token_path);
    assert_eq!(mount["readOnly"].as_bool(), Some(true));
    let sources = volume(agent, mount["name"].as_str().unwrap())["projected"]["sources"].as_sequence().unwrap();
    let token = sources
        .iter()
        .map(|source| &source["serviceAccountToken"])
        .find(|token| {
            token
                .get("path")
                .and_then(Value::as_str)
                .map(|path| Path::new(mount["mountPath"].as_str().unwrap()).join(path))
                == Some(token_path.clone())
        })
        .unwrap_or_else(|| panic!("no serviceAccountToken projected at {}", token_path.display()));
    assert_eq!(token["audience"].as_str(), Some(cluster.audience.as_str()));
    let lifetime = token["expirationSeconds"].as_u64().unwrap();
    assert!((600..=cluster.max_token_lifetime.as_secs()).contains(&lifetime), "expirationSeconds {lifetime}");

    // The pod runs as a service account on the cluster's allow list.
    let pod = &agent["spec"]["template"]["spec"];
    let account = format!(
        "{}:{}",
        str_at(agent, &["metadata", "namespace"]).unwrap(),
        pod["serviceAccountName"].as_str().unwrap()
    );
    assert!(cluster.service_account_allow_list.contains(&account), "{account} is not allow-listed");

    // The server authenticates the API server's discovery with the cluster's CA.
    let server = find(&objects, "StatefulSet", "tessera-server");
    let ca = cluster.ca_bundle_path.as_deref().expect("ca_bundle_path");
    let ca_mount = mount_containing(&containers(server)[0], ca);
    let ca_volume = volume(server, ca_mount["name"].as_str().unwrap());
    assert_eq!(str_at(ca_volume, &["configMap", "name"]), Some("kube-root-ca.crt"));
    assert_eq!(ca.file_name().and_then(|name| name.to_str()), Some("ca.crt"), "the ConfigMap's key");
}
