//! Chat templates: Jinja templates from the model's tokenizer files, rendered with minijinja set up
//! the way Hugging Face transformers sets up jinja2 (`trim_blocks`, `lstrip_blocks`, loop controls,
//! Python string/dict methods, `raise_exception`, `strftime_now`).

use std::collections::BTreeMap;
use std::path::Path;

use minijinja::{Environment, Error, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use crate::error::TokenizerError;

/// The name the template is registered under; template errors mention it with a line number.
const TEMPLATE_NAME: &str = "chat_template";

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// "system", "user", "assistant", ...
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into() }
    }
}

/// Special tokens passed to the template as variables (`bos_token`, `eos_token`, ...), when the
/// tokenizer config names them.
#[derive(Debug, Clone, Default)]
pub(crate) struct TemplateTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
}

/// A compiled chat template.
#[derive(Debug, Clone)]
pub(crate) struct ChatTemplate {
    env: Environment<'static>,
    tokens: TemplateTokens,
}

impl ChatTemplate {
    /// Compiles `source`; `origin` is the file it came from, for error messages.
    pub(crate) fn compile(source: String, origin: &Path, tokens: TemplateTokens) -> Result<Self, TokenizerError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", |format: String| crate::strftime::now_utc(&format));
        env.add_template_owned(TEMPLATE_NAME, source)
            .map_err(|source| TokenizerError::ChatTemplateSyntax { path: origin.to_owned(), source })?;
        Ok(ChatTemplate { env, tokens })
    }

    /// Renders the conversation. `add_generation_prompt` asks the template to end with the
    /// header of an assistant turn.
    pub(crate) fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        let render_err = |source| TokenizerError::ChatTemplateRender { source };
        let template = self.env.get_template(TEMPLATE_NAME).map_err(render_err)?;
        let mut ctx: BTreeMap<&str, Value> = BTreeMap::new();
        ctx.insert("messages", Value::from_serialize(messages));
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        let t = &self.tokens;
        for (name, token) in [
            ("bos_token", &t.bos_token),
            ("eos_token", &t.eos_token),
            ("pad_token", &t.pad_token),
            ("unk_token", &t.unk_token),
        ] {
            if let Some(token) = token {
                ctx.insert(name, Value::from(token.as_str()));
            }
        }
        template.render(ctx).map_err(render_err)
    }
}

/// `raise_exception(message)`: templates call it to reject a conversation they cannot format.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(source: &str) -> ChatTemplate {
        let tokens = TemplateTokens {
            bos_token: Some("<s>".into()),
            eos_token: Some("</s>".into()),
            ..TemplateTokens::default()
        };
        ChatTemplate::compile(source.into(), Path::new("test.jinja"), tokens).unwrap()
    }

    fn msgs() -> Vec<ChatMessage> {
        vec![ChatMessage::new("system", "  Be brief.  "), ChatMessage::new("user", "Hi")]
    }

    #[test]
    fn trims_blocks_like_hf() {
        let t = compile(
            "{{ bos_token }}\n{% for m in messages %}\n  {% if m.role == 'user' %}\n[U]{{ m.content }}\n  {% else %}\n[S]{{ m.content | trim }}\n  {% endif %}\n{% endfor %}\n{% if add_generation_prompt %}\n[A]\n{% endif %}\n",
        );
        assert_eq!(t.render(&msgs(), true).unwrap(), "<s>\n[S]Be brief.\n[U]Hi\n[A]\n");
        assert_eq!(t.render(&msgs(), false).unwrap(), "<s>\n[S]Be brief.\n[U]Hi\n");
    }

    #[test]
    fn python_methods_and_loop_controls() {
        let t = compile(
            "{% for m in messages %}{% if loop.index0 == 1 %}{% break %}{% endif %}{{ m['content'].strip().upper() }}|{{ m.role.startswith('sys') }}{% endfor %}{{ eos_token }}",
        );
        assert_eq!(t.render(&msgs(), false).unwrap(), "BE BRIEF.|True</s>");
    }

    #[test]
    fn raise_exception_surfaces_message() {
        let t = compile(
            "{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}",
        );
        let err = t.render(&msgs(), true).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("System role not supported"), "{text}");
        assert!(text.contains("chat_template"), "{text}");
    }

    #[test]
    fn strftime_now_renders_a_date() {
        let t = compile("{{ strftime_now('%Y-%m-%d') }}");
        let out = t.render(&[], false).unwrap();
        assert_eq!(out.len(), 10, "{out}");
        assert!(out.starts_with("20"), "{out}");
    }

    #[test]
    fn undefined_special_tokens_render_empty() {
        let tokens = TemplateTokens::default();
        let t = ChatTemplate::compile("[{{ bos_token }}]".into(), Path::new("x"), tokens).unwrap();
        assert_eq!(t.render(&[], false).unwrap(), "[]");
    }

    #[test]
    fn syntax_error_names_file() {
        let err = ChatTemplate::compile(
            "{% for m in messages %}".into(),
            Path::new("/m/tokenizer_config.json"),
            TemplateTokens::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("/m/tokenizer_config.json") && err.contains("compile"), "{err}");
    }
}
