//! The KMIP requests fieldcrypt sends and what it reads from their responses: byte for byte
//! libmongocrypt's (`kms-message/src/kms_kmip_request.c`, `kms_kmip_response.c`), so that a
//! KMIP server sees the same objects and attributes from both, and keys interoperate.
//!
//! | operation | protocol version | payload |
//! |---|---|---|
//! | Register | 1.0 | SecretData (type Seed, key format Opaque) of 96 bytes, Cryptographic Usage Mask 0 |
//! | Activate | 1.0 | Unique Identifier |
//! | Get | 1.0 | Unique Identifier |
//! | Create | 1.2 | Symmetric Key: AES, 256 bits, usage Encrypt \| Decrypt |
//! | Encrypt | 1.2 | Unique Identifier, AES-CBC-PKCS5 with a random IV chosen by the server, Data |
//! | Decrypt | 1.2 | Unique Identifier, AES-CBC-PKCS5, Data, IV |
//!
//! Every request is one batch item. A response is read the way libmongocrypt reads it: the
//! batch item's Result Status (with the optional Result Reason and Result Message when it is
//! not Success), then the payload's fields by tag.

use core::fmt;

use zeroize::Zeroizing;

use super::ttlv::{self, tag, Item, TtlvError, Writer};

/// The operations fieldcrypt sends (KMIP 1.0 §9.1.3.2.26).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Operation {
    Create,
    Register,
    Get,
    Activate,
    Encrypt,
    Decrypt,
}

impl Operation {
    fn code(self) -> u32 {
        match self {
            Operation::Create => 0x01,
            Operation::Register => 0x03,
            Operation::Get => 0x0A,
            Operation::Activate => 0x12,
            Operation::Encrypt => 0x1F,
            Operation::Decrypt => 0x20,
        }
    }

    /// Whether sending it twice does no harm: Register and Create make a new object each time,
    /// and Activate works only on a pre-active object (a second one, after a lost answer to
    /// the first, fails), so they are retried only when the first attempt never reached the
    /// server.
    pub(crate) fn idempotent(self) -> bool {
        !matches!(
            self,
            Operation::Create | Operation::Register | Operation::Activate
        )
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Operation::Create => "Create",
            Operation::Register => "Register",
            Operation::Get => "Get",
            Operation::Activate => "Activate",
            Operation::Encrypt => "Encrypt",
            Operation::Decrypt => "Decrypt",
        })
    }
}

/// The length of the secret libmongocrypt registers: a local master key's 96 bytes.
pub(crate) const SECRET_DATA_LEN: usize = 96;

/// The IV length of AES-CBC.
pub(crate) const IV_LEN: usize = 16;

const OBJECT_TYPE_SYMMETRIC_KEY: u32 = 0x02;
const OBJECT_TYPE_SECRET_DATA: u32 = 0x07;
const SECRET_DATA_TYPE_SEED: u32 = 0x02;
const KEY_FORMAT_TYPE_OPAQUE: u32 = 0x02;
const CRYPTOGRAPHIC_ALGORITHM_AES: u32 = 0x03;
const BLOCK_CIPHER_MODE_CBC: u32 = 0x01;
const PADDING_METHOD_PKCS5: u32 = 0x03;
const USAGE_MASK_ENCRYPT_DECRYPT: i32 = 0x04 | 0x08;

/// A request, in a buffer wiped on drop (Register carries the secret, Encrypt the data key).
pub(crate) struct Request {
    pub(crate) operation: Operation,
    pub(crate) bytes: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("operation", &self.operation)
            .field("len", &self.bytes.len())
            .finish()
    }
}

fn request(
    minor: i32,
    operation: Operation,
    payload: impl FnOnce(&mut Writer),
) -> Result<Request, TtlvError> {
    let mut w = Writer::new();
    w.structure(tag::REQUEST_MESSAGE, |w| {
        w.structure(tag::REQUEST_HEADER, |w| {
            w.structure(tag::PROTOCOL_VERSION, |w| {
                w.integer(tag::PROTOCOL_VERSION_MAJOR, 1);
                w.integer(tag::PROTOCOL_VERSION_MINOR, minor);
            });
            w.integer(tag::BATCH_COUNT, 1);
        });
        w.structure(tag::BATCH_ITEM, |w| {
            w.enumeration(tag::OPERATION, operation.code());
            w.structure(tag::REQUEST_PAYLOAD, payload);
        });
    });
    Ok(Request {
        operation,
        bytes: w.finish()?,
    })
}

fn attribute(w: &mut Writer, name: &str, value: impl FnOnce(&mut Writer)) {
    w.structure(tag::ATTRIBUTE, |w| {
        w.text(tag::ATTRIBUTE_NAME, name);
        value(w);
    });
}

/// Register a [`SECRET_DATA_LEN`]-byte secret as a SecretData object (KMIP 1.0).
pub(crate) fn register_secret_data(secret: &[u8; SECRET_DATA_LEN]) -> Result<Request, TtlvError> {
    request(0, Operation::Register, |w| {
        w.enumeration(tag::OBJECT_TYPE, OBJECT_TYPE_SECRET_DATA);
        w.structure(tag::TEMPLATE_ATTRIBUTE, |w| {
            // Required by the specification; 0 because the server does no cryptography with it.
            attribute(w, "Cryptographic Usage Mask", |w| {
                w.integer(tag::ATTRIBUTE_VALUE, 0);
            });
        });
        w.structure(tag::SECRET_DATA, |w| {
            w.enumeration(tag::SECRET_DATA_TYPE, SECRET_DATA_TYPE_SEED);
            w.structure(tag::KEY_BLOCK, |w| {
                w.enumeration(tag::KEY_FORMAT_TYPE, KEY_FORMAT_TYPE_OPAQUE);
                w.structure(tag::KEY_VALUE, |w| w.bytes(tag::KEY_MATERIAL, secret));
            });
        });
    })
}

/// Activate an object (KMIP 1.0).
pub(crate) fn activate(unique_identifier: &str) -> Result<Request, TtlvError> {
    request(0, Operation::Activate, |w| {
        w.text(tag::UNIQUE_IDENTIFIER, unique_identifier);
    })
}

/// Get an object (KMIP 1.0).
pub(crate) fn get(unique_identifier: &str) -> Result<Request, TtlvError> {
    request(0, Operation::Get, |w| {
        w.text(tag::UNIQUE_IDENTIFIER, unique_identifier);
    })
}

/// Create an AES-256 key for Encrypt and Decrypt (KMIP 1.2).
pub(crate) fn create_aes_256() -> Result<Request, TtlvError> {
    request(2, Operation::Create, |w| {
        w.enumeration(tag::OBJECT_TYPE, OBJECT_TYPE_SYMMETRIC_KEY);
        w.structure(tag::TEMPLATE_ATTRIBUTE, |w| {
            attribute(w, "Cryptographic Algorithm", |w| {
                w.enumeration(tag::ATTRIBUTE_VALUE, CRYPTOGRAPHIC_ALGORITHM_AES);
            });
            attribute(w, "Cryptographic Length", |w| {
                w.integer(tag::ATTRIBUTE_VALUE, 256);
            });
            attribute(w, "Cryptographic Usage Mask", |w| {
                w.integer(tag::ATTRIBUTE_VALUE, USAGE_MASK_ENCRYPT_DECRYPT);
            });
        });
    })
}

fn cbc_parameters(w: &mut Writer, random_iv: bool) {
    w.structure(tag::CRYPTOGRAPHIC_PARAMETERS, |w| {
        w.enumeration(tag::BLOCK_CIPHER_MODE, BLOCK_CIPHER_MODE_CBC);
        w.enumeration(tag::PADDING_METHOD, PADDING_METHOD_PKCS5);
        w.enumeration(tag::CRYPTOGRAPHIC_ALGORITHM, CRYPTOGRAPHIC_ALGORITHM_AES);
        if random_iv {
            w.boolean(tag::RANDOM_IV, true);
        }
    });
}

/// Encrypt `plaintext` with AES-CBC under the key `unique_identifier`, the server choosing a
/// random IV (KMIP 1.2).
pub(crate) fn encrypt(unique_identifier: &str, plaintext: &[u8]) -> Result<Request, TtlvError> {
    request(2, Operation::Encrypt, |w| {
        w.text(tag::UNIQUE_IDENTIFIER, unique_identifier);
        cbc_parameters(w, true);
        w.bytes(tag::DATA, plaintext);
    })
}

/// Decrypt AES-CBC `ciphertext` with `iv` under the key `unique_identifier` (KMIP 1.2).
pub(crate) fn decrypt(
    unique_identifier: &str,
    ciphertext: &[u8],
    iv: &[u8],
) -> Result<Request, TtlvError> {
    request(2, Operation::Decrypt, |w| {
        w.text(tag::UNIQUE_IDENTIFIER, unique_identifier);
        cbc_parameters(w, false);
        w.bytes(tag::DATA, ciphertext);
        w.bytes(tag::IV_COUNTER_NONCE, iv);
    })
}

/// Why a response gives no result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ResponseError {
    /// The server answered with a Result Status other than Success.
    Failed {
        /// The Result Status.
        status: u32,
        /// The Result Reason, if given.
        reason: Option<u32>,
        /// The Result Message, if given (the server's text, shortened).
        message: Option<String>,
    },
    /// Not a response fieldcrypt can read.
    Malformed(String),
    /// A well-formed response about another kind of object than asked for.
    WrongObject(&'static str),
}

/// KMIP's Result Reason "Item Not Found".
pub(crate) const REASON_ITEM_NOT_FOUND: u32 = 0x01;
/// KMIP's Result Reason "Cryptographic Failure".
pub(crate) const REASON_CRYPTOGRAPHIC_FAILURE: u32 = 0x0A;
/// KMIP's Result Reason "General Failure".
pub(crate) const REASON_GENERAL_FAILURE: u32 = 0x100;

/// The longest Result Message kept for an error.
const MAX_MESSAGE_CHARS: usize = 200;

fn status_name(status: u32) -> &'static str {
    match status {
        0 => "Success",
        1 => "Operation Failed",
        2 => "Operation Pending",
        3 => "Operation Undone",
        _ => "unknown status",
    }
}

fn reason_name(reason: u32) -> &'static str {
    match reason {
        0x01 => "Item Not Found",
        0x02 => "Response Too Large",
        0x03 => "Authentication Not Successful",
        0x04 => "Invalid Message",
        0x05 => "Operation Not Supported",
        0x06 => "Missing Data",
        0x07 => "Invalid Field",
        0x08 => "Feature Not Supported",
        0x09 => "Operation Canceled By Requester",
        0x0A => "Cryptographic Failure",
        0x0B => "Illegal Operation",
        0x0C => "Permission Denied",
        0x0D => "Object Archived",
        0x0E => "Index Out of Bounds",
        0x0F => "Application Namespace Not Supported",
        0x10 => "Key Format Type Not Supported",
        0x11 => "Key Compression Type Not Supported",
        0x12 => "Encoding Option Error",
        0x13 => "Key Value Not Present",
        0x14 => "Attestation Required",
        0x15 => "Attestation Failed",
        0x16 => "Sensitive",
        0x17 => "Not Extractable",
        0x18 => "Object Already Exists",
        0x100 => "General Failure",
        _ => "unknown reason",
    }
}

impl fmt::Display for ResponseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResponseError::Failed {
                status,
                reason,
                message,
            } => {
                write!(f, "Result Status {status} ({})", status_name(*status))?;
                if let Some(r) = reason {
                    write!(f, ", Result Reason {r} ({})", reason_name(*r))?;
                }
                if let Some(m) = message {
                    write!(f, ", Result Message {m:?}")?;
                }
                Ok(())
            }
            ResponseError::Malformed(why) => write!(f, "malformed response: {why}"),
            ResponseError::WrongObject(why) => f.write_str(why),
        }
    }
}

impl From<TtlvError> for ResponseError {
    fn from(e: TtlvError) -> Self {
        ResponseError::Malformed(e.to_string())
    }
}

/// The server's text, printable and bounded.
fn clean_message(m: &str) -> String {
    let mut out: String = m
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_MESSAGE_CHARS)
        .collect();
    if m.chars().count() > MAX_MESSAGE_CHARS {
        out.push('…');
    }
    out
}

/// A decoded response to one request.
pub(crate) struct Response<'a> {
    payload: Item<'a>,
}

impl<'a> Response<'a> {
    /// Reads the response to a request for `operation`: one batch item whose Result Status is
    /// Success, echoing the operation, with a Response Payload.
    ///
    /// # Errors
    /// [`ResponseError::Failed`] with the server's status, reason and message;
    /// [`ResponseError::Malformed`] for anything else.
    pub(crate) fn parse(bytes: &'a [u8], operation: Operation) -> Result<Self, ResponseError> {
        let root = ttlv::parse(bytes)?;
        if root.tag != tag::RESPONSE_MESSAGE {
            return Err(ResponseError::Malformed("not a Response Message".into()));
        }
        let batch = root
            .find(tag::BATCH_ITEM)
            .filter(|b| b.is_structure())
            .ok_or_else(|| ResponseError::Malformed("no Batch Item".into()))?;
        let status = batch
            .find(tag::RESULT_STATUS)
            .and_then(Item::as_enumeration)
            .ok_or_else(|| ResponseError::Malformed("no Result Status".into()))?;
        if status != 0 {
            return Err(ResponseError::Failed {
                status,
                reason: batch
                    .find(tag::RESULT_REASON)
                    .and_then(Item::as_enumeration),
                message: batch
                    .find(tag::RESULT_MESSAGE)
                    .and_then(Item::as_text)
                    .map(clean_message),
            });
        }
        // The specification makes the Operation required in a response; a different one is
        // the answer to another request.
        if let Some(op) = batch.find(tag::OPERATION) {
            if op.as_enumeration() != Some(operation.code()) {
                return Err(ResponseError::Malformed(format!(
                    "answers another operation than {operation}"
                )));
            }
        }
        let payload = batch
            .find(tag::RESPONSE_PAYLOAD)
            .filter(|p| p.is_structure())
            .ok_or_else(|| ResponseError::Malformed("no Response Payload".into()))?
            .clone();
        Ok(Response { payload })
    }

    fn field(&self, t: u32, name: &str) -> Result<&Item<'a>, ResponseError> {
        self.payload
            .find(t)
            .ok_or_else(|| ResponseError::Malformed(format!("no {name} in the payload")))
    }

    /// The Unique Identifier (Register, Create, Activate, Encrypt, Decrypt responses).
    pub(crate) fn unique_identifier(&self) -> Result<&'a str, ResponseError> {
        self.field(tag::UNIQUE_IDENTIFIER, "Unique Identifier")?
            .as_text()
            .ok_or_else(|| ResponseError::Malformed("Unique Identifier is not text".into()))
    }

    /// The key material of a Get response for a SecretData object.
    pub(crate) fn secret_data(&self) -> Result<&'a [u8], ResponseError> {
        if let Some(t) = self.payload.find(tag::OBJECT_TYPE) {
            if t.as_enumeration() != Some(OBJECT_TYPE_SECRET_DATA) {
                return Err(ResponseError::WrongObject(
                    "the object is not a SecretData (a delegated key's id used without \
                     delegated: true?)",
                ));
            }
        }
        self.field(tag::SECRET_DATA, "SecretData")?
            .find(tag::KEY_BLOCK)
            .and_then(|b| b.find(tag::KEY_VALUE))
            .and_then(|v| v.find(tag::KEY_MATERIAL))
            .and_then(Item::as_bytes)
            .ok_or_else(|| {
                ResponseError::Malformed(
                    "no byte-string Key Material in SecretData's Key Block".into(),
                )
            })
    }

    /// The Data of an Encrypt or Decrypt response.
    pub(crate) fn data(&self) -> Result<&'a [u8], ResponseError> {
        self.field(tag::DATA, "Data")?
            .as_bytes()
            .ok_or_else(|| ResponseError::Malformed("Data is not a byte string".into()))
    }

    /// The IV/Counter/Nonce of an Encrypt response.
    pub(crate) fn iv(&self) -> Result<&'a [u8], ResponseError> {
        self.field(tag::IV_COUNTER_NONCE, "IV/Counter/Nonce")?
            .as_bytes()
            .ok_or_else(|| ResponseError::Malformed("IV/Counter/Nonce is not a byte string".into()))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A message of `testdata/libmongocrypt.txt`.
    pub(crate) fn vector(name: &str) -> Vec<u8> {
        include_str!("testdata/libmongocrypt.txt")
            .lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .map(|h| hex::decode(h).unwrap())
            .unwrap_or_else(|| panic!("no vector {name}"))
    }

    const UID: &str = "7FJYvnV6XkaUCWuY96bCSc6AuhvkPpqI";

    #[test]
    fn requests_are_byte_for_byte_libmongocrypts() {
        let secret: [u8; SECRET_DATA_LEN] =
            vector("register_secretdata_secretdata").try_into().unwrap();
        let req = register_secret_data(&secret).unwrap();
        assert_eq!(*req.bytes, vector("register_secretdata_request"));
        assert_eq!(*get(UID).unwrap().bytes, vector("get_request"));
        assert_eq!(*activate(UID).unwrap().bytes, vector("activate_request"));
        assert_eq!(
            format!("{req:?}"),
            format!(
                "Request {{ operation: Register, len: {} }}",
                req.bytes.len()
            )
        );
    }

    #[test]
    fn reads_libmongocrypts_responses() {
        let r = vector("success_register_response");
        let r = Response::parse(&r, Operation::Register).unwrap();
        assert_eq!(r.unique_identifier().unwrap(), "39");
        let g = vector("success_get_response");
        let g = Response::parse(&g, Operation::Get).unwrap();
        assert_eq!(
            g.secret_data().unwrap(),
            vector("success_get_response_secretdata")
        );
        let e = vector("error_get_response_notfound");
        let e = Response::parse(&e, Operation::Get).err().unwrap();
        assert!(
            matches!(
                &e,
                ResponseError::Failed {
                    status: 1,
                    reason: Some(REASON_ITEM_NOT_FOUND),
                    message: Some(_)
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("Item Not Found"), "{e}");
    }

    #[test]
    fn versions_and_operations() {
        for (req, minor, op) in [
            (activate("7").unwrap(), 0, 0x12),
            (get("7").unwrap(), 0, 0x0A),
            (create_aes_256().unwrap(), 2, 0x01),
            (encrypt("7", &[1; 96]).unwrap(), 2, 0x1F),
            (decrypt("7", &[1; 112], &[2; 16]).unwrap(), 2, 0x20),
        ] {
            let item = ttlv::parse(&req.bytes).unwrap();
            let header = item.find(tag::REQUEST_HEADER).unwrap();
            let version = header.find(tag::PROTOCOL_VERSION).unwrap();
            assert_eq!(
                version
                    .find(tag::PROTOCOL_VERSION_MAJOR)
                    .unwrap()
                    .as_integer(),
                Some(1)
            );
            assert_eq!(
                version
                    .find(tag::PROTOCOL_VERSION_MINOR)
                    .unwrap()
                    .as_integer(),
                Some(minor)
            );
            let batch = item.find(tag::BATCH_ITEM).unwrap();
            assert_eq!(
                batch.find(tag::OPERATION).unwrap().as_enumeration(),
                Some(op)
            );
        }
        // Encrypt asks for a random IV; Decrypt sends the IV.
        let enc = encrypt("7", &[1; 16]).unwrap();
        let item = ttlv::parse(&enc.bytes).unwrap();
        let payload = item
            .find(tag::BATCH_ITEM)
            .unwrap()
            .find(tag::REQUEST_PAYLOAD)
            .unwrap();
        let params = payload.find(tag::CRYPTOGRAPHIC_PARAMETERS).unwrap();
        assert_eq!(
            params.find(tag::RANDOM_IV).unwrap().value,
            ttlv::Value::Boolean(true)
        );
        assert!(payload.find(tag::IV_COUNTER_NONCE).is_none());
        let dec = decrypt("7", &[1; 16], &[2; 16]).unwrap();
        let item = ttlv::parse(&dec.bytes).unwrap();
        let payload = item
            .find(tag::BATCH_ITEM)
            .unwrap()
            .find(tag::REQUEST_PAYLOAD)
            .unwrap();
        assert!(payload
            .find(tag::CRYPTOGRAPHIC_PARAMETERS)
            .unwrap()
            .find(tag::RANDOM_IV)
            .is_none());
        assert_eq!(
            payload.find(tag::IV_COUNTER_NONCE).unwrap().as_bytes(),
            Some(&[2u8; 16][..])
        );
    }

    fn response(op: u32, status: u32, body: impl FnOnce(&mut Writer)) -> Vec<u8> {
        let mut w = Writer::new();
        w.structure(tag::RESPONSE_MESSAGE, |w| {
            w.structure(tag::BATCH_ITEM, |w| {
                w.enumeration(tag::OPERATION, op);
                w.enumeration(tag::RESULT_STATUS, status);
                body(w);
            });
        });
        w.finish().unwrap().to_vec()
    }

    #[test]
    fn reads_a_get_response() {
        let bytes = response(0x0A, 0, |w| {
            w.structure(tag::RESPONSE_PAYLOAD, |w| {
                w.enumeration(tag::OBJECT_TYPE, OBJECT_TYPE_SECRET_DATA);
                w.text(tag::UNIQUE_IDENTIFIER, "39");
                w.structure(tag::SECRET_DATA, |w| {
                    w.enumeration(tag::SECRET_DATA_TYPE, 1);
                    w.structure(tag::KEY_BLOCK, |w| {
                        w.enumeration(tag::KEY_FORMAT_TYPE, 2);
                        w.structure(tag::KEY_VALUE, |w| w.bytes(tag::KEY_MATERIAL, &[9; 96]));
                    });
                });
            });
        });
        let r = Response::parse(&bytes, Operation::Get).unwrap();
        assert_eq!(r.unique_identifier().unwrap(), "39");
        assert_eq!(r.secret_data().unwrap(), &[9; 96][..]);
        assert!(r.data().is_err());
        // Read as the answer to another operation, it is refused.
        assert!(matches!(
            Response::parse(&bytes, Operation::Activate),
            Err(ResponseError::Malformed(m)) if m.contains("Activate")
        ));
    }

    #[test]
    fn fail_a_symmetric_key_read_as_secret_data() {
        let bytes = response(0x0A, 0, |w| {
            w.structure(tag::RESPONSE_PAYLOAD, |w| {
                w.enumeration(tag::OBJECT_TYPE, OBJECT_TYPE_SYMMETRIC_KEY);
                w.text(tag::UNIQUE_IDENTIFIER, "39");
            });
        });
        let r = Response::parse(&bytes, Operation::Get).unwrap();
        let e = r.secret_data().unwrap_err().to_string();
        assert!(e.contains("not a SecretData"), "{e}");
    }

    #[test]
    fn reads_failures_as_libmongocrypt_does() {
        let bytes = response(0x0A, 1, |w| {
            w.enumeration(tag::RESULT_REASON, 1);
            w.text(tag::RESULT_MESSAGE, "Could not locate object: 99\n");
        });
        let e = Response::parse(&bytes, Operation::Get).err().unwrap();
        assert_eq!(
            e,
            ResponseError::Failed {
                status: 1,
                reason: Some(REASON_ITEM_NOT_FOUND),
                message: Some("Could not locate object: 99 ".into())
            }
        );
        assert_eq!(
            e.to_string(),
            "Result Status 1 (Operation Failed), Result Reason 1 (Item Not Found), Result \
             Message \"Could not locate object: 99 \""
        );
        // Without reason and message; and a long message is cut.
        let bytes = response(0x0A, 1, |_| {});
        let e = Response::parse(&bytes, Operation::Get)
            .err()
            .unwrap()
            .to_string();
        assert_eq!(e, "Result Status 1 (Operation Failed)");
        let long = "x".repeat(5000);
        let bytes = response(0x0A, 1, |w| w.text(tag::RESULT_MESSAGE, &long));
        let e = Response::parse(&bytes, Operation::Get)
            .err()
            .unwrap()
            .to_string();
        assert!(e.len() < 300 && e.ends_with("…\""), "{e}");
    }

    #[test]
    fn fail_responses_without_the_parts_read() {
        for bytes in [
            // A request, not a response.
            get("1").unwrap().bytes.to_vec(),
            // No batch item.
            {
                let mut w = Writer::new();
                w.structure(tag::RESPONSE_MESSAGE, |_| {});
                w.finish().unwrap().to_vec()
            },
            // No status.
            {
                let mut w = Writer::new();
                w.structure(tag::RESPONSE_MESSAGE, |w| {
                    w.structure(tag::BATCH_ITEM, |_| {})
                });
                w.finish().unwrap().to_vec()
            },
            // Success without a payload.
            response(0x0A, 0, |_| {}),
            // A payload that is not a structure.
            response(0x0A, 0, |w| w.text(tag::RESPONSE_PAYLOAD, "x")),
        ] {
            assert!(
                matches!(
                    Response::parse(&bytes, Operation::Get),
                    Err(ResponseError::Malformed(_))
                ),
                "{bytes:?}"
            );
        }
        // Fields of the wrong type.
        let bytes = response(0x1F, 0, |w| {
            w.structure(tag::RESPONSE_PAYLOAD, |w| {
                w.integer(tag::UNIQUE_IDENTIFIER, 1);
                w.text(tag::DATA, "x");
                w.text(tag::IV_COUNTER_NONCE, "x");
            });
        });
        let r = Response::parse(&bytes, Operation::Encrypt).unwrap();
        assert!(r.unique_identifier().is_err() && r.data().is_err() && r.iv().is_err());
        assert!(r.secret_data().is_err());
    }
}
