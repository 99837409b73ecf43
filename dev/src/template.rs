//! Upstream configuration files (dev/config/) rendered with a few values.
//!
//! The files read like upstream's documentation; `{{name}}` marks the values
//! sluice-dev fills in. Rendering fails when a placeholder is left without a
//! value, so a typo in a template is caught by the unit tests, not at start.

/// An upstream configuration file shipped in dev/config/.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Template {
    pub name: &'static str,
    pub text: &'static str,
}

macro_rules! template {
    ($ident:ident, $file:literal) => {
        pub const $ident: Template = Template { name: $file, text: include_str!(concat!("../config/", $file)) };
    };
}

template!(KUBELET, "kubelet.yaml");
template!(CONTAINERD, "containerd.toml");
template!(KUBE_PROXY, "kube-proxy.yaml");
template!(KUBE_SCHEDULER, "kube-scheduler.yaml");
template!(AUDIT_POLICY, "audit-policy.yaml");
template!(CNI_BRIDGE, "cni-bridge.conflist");
template!(COREFILE, "Corefile");
template!(COREDNS_RBAC, "coredns-rbac.yaml");

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TemplateError {
    #[error("template {template}: placeholder {{{{{placeholder}}}}} has no value")]
    Unbound { template: &'static str, placeholder: String },
    #[error("template {template}: value {name} is not used by the template")]
    Unused { template: &'static str, name: String },
}

impl Template {
    /// Replaces every `{{name}}` with its value. Every placeholder must have a
    /// value and every value must be used.
    pub fn render(&self, values: &[(&str, &str)]) -> Result<String, TemplateError> {
        let mut out = String::with_capacity(self.text.len());
        let mut used = vec![false; values.len()];
        let mut rest = self.text;
        while let Some(start) = rest.find("{{") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let Some(end) = after.find("}}") else {
                return Err(TemplateError::Unbound {
                    template: self.name,
                    placeholder: after.chars().take(20).collect(),
                });
            };
            let key = after[..end].trim();
            match values.iter().position(|(k, _)| *k == key) {
                Some(i) => {
                    used[i] = true;
                    out.push_str(values[i].1);
                }
                None => {
                    return Err(TemplateError::Unbound { template: self.name, placeholder: key.to_string() });
                }
            }
            rest = &after[end + 2..];
        }
        out.push_str(rest);
        if let Some(i) = used.iter().position(|u| !u) {
            return Err(TemplateError::Unused { template: self.name, name: values[i].0.to_string() });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Template = Template { name: "t", text: "a: {{x}}\nb: {{ y }}\n" };

    #[test]
    fn renders_every_placeholder() {
        assert_eq!(T.render(&[("x", "1"), ("y", "2")]).unwrap(), "a: 1\nb: 2\n");
    }

    #[test]
    fn missing_value_is_an_error() {
        assert_eq!(T.render(&[("x", "1")]), Err(TemplateError::Unbound { template: "t", placeholder: "y".into() }));
    }

    #[test]
    fn unused_value_is_an_error() {
        assert!(matches!(T.render(&[("x", "1"), ("y", "2"), ("z", "3")]), Err(TemplateError::Unused { .. })));
    }

    #[test]
    fn static_templates_have_no_placeholders() {
        assert_eq!(AUDIT_POLICY.render(&[]).unwrap(), AUDIT_POLICY.text);
        assert_eq!(COREDNS_RBAC.render(&[]).unwrap(), COREDNS_RBAC.text);
    }
}
