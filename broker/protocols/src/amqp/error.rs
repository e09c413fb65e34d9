//! AMQP's reply codes, and the errors that close a channel or the connection.

use amq_protocol::protocol::AMQPClass;

/// Reply codes as RabbitMQ uses them.
pub mod code {
    /// Normal close.
    pub const REPLY_SUCCESS: u16 = 200;
    /// Unroutable mandatory message (basic.return).
    pub const NO_ROUTE: u16 = 312;
    /// The broker closed the connection (it is shutting down).
    pub const CONNECTION_FORCED: u16 = 320;
    /// Refused: credentials, or a reserved name.
    pub const ACCESS_REFUSED: u16 = 403;
    /// No such exchange or queue.
    pub const NOT_FOUND: u16 = 404;
    /// Exclusively held elsewhere.
    pub const RESOURCE_LOCKED: u16 = 405;
    /// Contradicts what exists, or an unknown delivery tag.
    pub const PRECONDITION_FAILED: u16 = 406;
    /// A frame that is no frame, or too large.
    pub const FRAME_ERROR: u16 = 501;
    /// A method or field that does not parse.
    pub const SYNTAX_ERROR: u16 = 502;
    /// A method not allowed now.
    pub const COMMAND_INVALID: u16 = 503;
    /// A frame for a channel that is not open.
    pub const CHANNEL_ERROR: u16 = 504;
    /// A content frame where none is expected.
    pub const UNEXPECTED_FRAME: u16 = 505;
    /// Not allowed: unknown vhost, duplicate consumer tag.
    pub const NOT_ALLOWED: u16 = 530;
    /// Not implemented (yet).
    pub const NOT_IMPLEMENTED: u16 = 540;
    /// The broker failed.
    pub const INTERNAL_ERROR: u16 = 541;
}

/// What an error closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The channel it happened on.
    Channel,
    /// The whole connection.
    Connection,
}

/// An error answered with channel.close or connection.close.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closing {
    /// Channel or connection.
    pub scope: Scope,
    /// The reply code.
    pub code: u16,
    /// What went wrong, as the client shows it.
    pub text: String,
    /// The method that caused it, if any.
    pub class_id: u16,
    /// See `class_id`.
    pub method_id: u16,
}

impl Closing {
    /// Closes the channel.
    pub fn channel(code: u16, text: impl Into<String>) -> Self {
        Self::new(Scope::Channel, code, text)
    }

    /// Closes the connection.
    pub fn connection(code: u16, text: impl Into<String>) -> Self {
        Self::new(Scope::Connection, code, text)
    }

    fn new(scope: Scope, code: u16, text: impl Into<String>) -> Self {
        let mut text = text.into();
        // Reply texts are short strings.
        if text.len() > 255 {
            let mut end = 255;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
        }
        Self {
            scope,
            code,
            text,
            class_id: 0,
            method_id: 0,
        }
    }

    /// Names the method that caused it.
    pub fn on(mut self, method: &AMQPClass) -> Self {
        self.class_id = method.get_amqp_class_id();
        self.method_id = method.get_amqp_method_id();
        self
    }
}
