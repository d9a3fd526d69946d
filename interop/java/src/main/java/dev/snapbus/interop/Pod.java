package dev.snapbus.interop;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.node.ArrayNode;
import com.fasterxml.jackson.databind.node.ObjectNode;
import java.io.File;
import java.io.InputStream;
import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.HexFormat;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.UUID;
import org.apache.avro.Conversions;
import org.apache.avro.Schema;
import org.apache.avro.SchemaNormalization;
import org.apache.avro.generic.GenericData;
import org.apache.avro.generic.GenericRecord;
import org.apache.avro.message.BinaryMessageDecoder;
import org.apache.avro.message.BinaryMessageEncoder;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.clients.producer.RecordMetadata;
import org.apache.kafka.clients.producer.internals.BuiltInPartitioner;
import org.apache.kafka.common.PartitionInfo;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;
import org.apache.kafka.common.serialization.ByteArraySerializer;
import org.apache.kafka.common.utils.Utils;

/**
 * A snapbus pod in Java: the wire contract with the reference libraries only.
 *
 * <pre>
 *   vectors FILE...                 check every vector (exit 1 naming each difference)
 *   publish BOOTSTRAP TOPIC OUT     publish sessions, update one, evict one; write OUT (JSON)
 *   read BOOTSTRAP TOPIC            print every record of the topic as a JSON line
 * </pre>
 */
public final class Pod {
    static final String[] FIELDS = {"session_id", "repo_id", "agent_id", "agent_name",
        "changeset_id", "intent", "base_commit", "state", "mode"};
    static final ObjectMapper JSON = new ObjectMapper();
    static final HexFormat HEX = HexFormat.of();

    final Schema schema;
    final GenericData model = new GenericData();
    final BinaryMessageEncoder<GenericRecord> encoder;
    final BinaryMessageDecoder<GenericRecord> decoder;

    Pod() throws Exception {
        try (InputStream in = Pod.class.getResourceAsStream("/workspace_snapshot.avsc")) {
            schema = new Schema.Parser().parse(in);
        }
        // ids as java.util.UUID, as a Java pod with generated classes holds them
        model.addLogicalTypeConversion(new Conversions.UUIDConversion());
        encoder = new BinaryMessageEncoder<>(model, schema);
        decoder = new BinaryMessageDecoder<>(model, schema);
    }

    GenericRecord record(JsonNode snapshot) {
        GenericData.Record record = new GenericData.Record(schema);
        for (String field : FIELDS) {
            String text = snapshot.get(field).asText();
            record.put(field, field.endsWith("_id") && !field.equals("agent_id")
                ? UUID.fromString(text) : text);
        }
        return record;
    }

    static ObjectNode json(GenericRecord record) {
        ObjectNode out = JSON.createObjectNode();
        for (String field : FIELDS) {
            out.put(field, record.get(field).toString());
        }
        return out;
    }

    byte[] encode(GenericRecord record) throws Exception {
        ByteBuffer buffer = encoder.encode(record);
        byte[] bytes = new byte[buffer.remaining()];
        buffer.get(bytes);
        return bytes;
    }

    static String firstDifference(byte[] actual, byte[] expected) {
        for (int i = 0; i < Math.min(actual.length, expected.length); i++) {
            if (actual[i] != expected[i]) {
                return String.format("byte %d: %02x != expected %02x", i, actual[i], expected[i]);
            }
        }
        return "length " + actual.length + " != expected " + expected.length;
    }

    static void check(List<String> failures, JsonNode placement, byte[] key, String what) {
        int murmur = Utils.murmur2(key);
        if (murmur != placement.get("murmur2").asInt()) {
            failures.add(what + ": murmur2 " + murmur + " != expected " + placement.get("murmur2"));
        }
        placement.get("partition").fields().forEachRemaining(e -> {
            int n = Integer.parseInt(e.getKey());
            int got = BuiltInPartitioner.partitionForKey(key, n);
            if (got != e.getValue().asInt()) {
                failures.add(what + ": partition of " + n + " is " + got + " != expected " + e.getValue());
            }
        });
    }

    int vectors(List<String> files) throws Exception {
        List<String> failures = new ArrayList<>();
        int checked = 0;
        String fingerprint = String.format("0x%016x", SchemaNormalization.parsingFingerprint64(schema));
        for (String file : files) {
            JsonNode doc = JSON.readTree(new File(file));
            String expected = doc.get("fingerprint").get("java_parsing_fingerprint64").asText();
            if (!fingerprint.equals(expected)) {
                failures.add(file + ": fingerprint " + fingerprint + " != expected " + expected);
            }
            for (JsonNode vector : doc.get("snapshots")) {
                String name = vector.get("name").asText();
                JsonNode snapshot = vector.get("snapshot");
                byte[] key = snapshot.get("session_id").asText().getBytes(StandardCharsets.UTF_8);
                byte[] expectedKey = HEX.parseHex(vector.get("key_hex").asText());
                byte[] expectedValue = HEX.parseHex(vector.get("value_hex").asText());
                if (!java.util.Arrays.equals(key, expectedKey)) {
                    failures.add(name + ": key " + firstDifference(key, expectedKey));
                }
                GenericRecord decoded = decoder.decode(expectedValue);
                for (String field : FIELDS) {
                    String got = decoded.get(field).toString();
                    String want = snapshot.get(field).asText();
                    if (!got.equals(want)) {
                        failures.add(name + ": field " + field + " decodes to " + JSON.writeValueAsString(got)
                            + " != expected " + JSON.writeValueAsString(want));
                    }
                }
                byte[] value = encode(record(snapshot));
                if (!java.util.Arrays.equals(value, expectedValue)) {
                    failures.add(name + ": value " + firstDifference(value, expectedValue));
                }
                check(failures, vector, key, name);
                checked++;
            }
            for (JsonNode entry : doc.get("keys")) {
                check(failures, entry, entry.get("key").asText().getBytes(StandardCharsets.UTF_8),
                    "key " + entry.get("key").asText());
                checked++;
            }
        }
        for (String failure : failures) {
            System.err.println("MISMATCH " + failure);
        }
        System.out.println(JSON.writeValueAsString(Map.of("checked", checked, "failures", failures.size(),
            "fingerprint", fingerprint)));
        return failures.isEmpty() ? 0 : 1;
    }

    static Properties clientConfig(String bootstrap) {
        Properties props = new Properties();
        props.put("bootstrap.servers", bootstrap);
        return props;
    }

    ObjectNode session(String intent, String agent, String state, String mode) {
        ObjectNode s = JSON.createObjectNode();
        s.put("session_id", UUID.randomUUID().toString());
        s.put("repo_id", UUID.randomUUID().toString());
        s.put("agent_id", agent);
        s.put("agent_name", "agent-java");
        s.put("changeset_id", UUID.randomUUID().toString());
        s.put("intent", intent);
        s.put("base_commit", "0123456789abcdef0123456789abcdef01234567");
        s.put("state", state);
        s.put("mode", mode);
        return s;
    }

    int publish(String bootstrap, String topic, String out) throws Exception {
        List<ObjectNode> sessions = new ArrayList<>(List.of(
            session("written by the Java pod", "user_java", "active", "ephemeral"),
            session("", "", "", ""),
            session("répare ☕ 修复 🚀 \u0000 שלום", "usér_ß", "активен", "persistent"),
            session("long ".repeat(180_000), "user_java", "submitted", "persistent"),
            session("to be evicted", "user_java", "active", "ephemeral")));
        Properties props = clientConfig(bootstrap);
        props.put("acks", "all");
        props.put("max.request.size", "1100000");
        ArrayNode published = JSON.createArrayNode();
        ArrayNode evicted = JSON.createArrayNode();
        int partitions;
        try (KafkaProducer<byte[], byte[]> producer =
                 new KafkaProducer<>(props, new ByteArraySerializer(), new ByteArraySerializer())) {
            partitions = producer.partitionsFor(topic).size();
            // an update of the first session: the view must show this one
            ObjectNode updated = sessions.get(0).deepCopy();
            updated.put("state", "merged");
            List<ObjectNode> writes = new ArrayList<>(sessions);
            writes.add(updated);
            for (ObjectNode s : writes) {
                byte[] key = s.get("session_id").asText().getBytes(StandardCharsets.UTF_8);
                RecordMetadata meta = producer.send(new ProducerRecord<>(topic, key, encode(record(s)))).get();
                ObjectNode entry = JSON.createObjectNode();
                entry.set("snapshot", s);
                entry.put("partition", meta.partition());
                entry.put("offset", meta.offset());
                published.add(entry);
            }
            String gone = sessions.get(4).get("session_id").asText();
            RecordMetadata meta = producer.send(new ProducerRecord<>(
                topic, gone.getBytes(StandardCharsets.UTF_8), null)).get();
            ObjectNode entry = JSON.createObjectNode();
            entry.put("session_id", gone);
            entry.put("partition", meta.partition());
            entry.put("offset", meta.offset());
            evicted.add(entry);
        }
        ObjectNode result = JSON.createObjectNode();
        result.put("client", "kafka-clients " + org.apache.kafka.common.utils.internals.AppInfoParser.getVersion());
        result.put("partitions", partitions);
        result.set("published", published);
        result.set("evicted", evicted);
        JSON.writeValue(new File(out), result);
        return 0;
    }

    int read(String bootstrap, String topic) throws Exception {
        Properties props = clientConfig(bootstrap);
        props.put("enable.auto.commit", "false");
        props.put("max.partition.fetch.bytes", "2000000");
        int bad = 0;
        try (KafkaConsumer<byte[], byte[]> consumer =
                 new KafkaConsumer<>(props, new ByteArrayDeserializer(), new ByteArrayDeserializer())) {
            List<TopicPartition> parts = new ArrayList<>();
            for (PartitionInfo info : consumer.partitionsFor(topic, Duration.ofSeconds(30))) {
                parts.add(new TopicPartition(topic, info.partition()));
            }
            int count = parts.size();
            consumer.assign(parts);
            consumer.seekToBeginning(parts);
            Map<TopicPartition, Long> end = new HashMap<>(consumer.endOffsets(parts, Duration.ofSeconds(30)));
            long deadline = System.nanoTime() + Duration.ofSeconds(60).toNanos();
            while (end.entrySet().stream().anyMatch(e -> consumer.position(e.getKey()) < e.getValue())) {
                if (System.nanoTime() > deadline) {
                    throw new IllegalStateException("did not reach the end offsets " + end + " in 60 s");
                }
                for (ConsumerRecord<byte[], byte[]> rec : consumer.poll(Duration.ofMillis(500))) {
                    ObjectNode line = JSON.createObjectNode();
                    line.put("partition", rec.partition());
                    line.put("offset", rec.offset());
                    line.put("key", new String(rec.key(), StandardCharsets.UTF_8));
                    line.put("default_partition", BuiltInPartitioner.partitionForKey(rec.key(), count));
                    if (rec.value() == null) {
                        line.putNull("snapshot");
                    } else {
                        try {
                            line.set("snapshot", json(decoder.decode(rec.value())));
                        } catch (Exception exc) {
                            line.put("error", exc.toString());
                            bad++;
                        }
                    }
                    System.out.println(JSON.writeValueAsString(line));
                }
            }
        }
        return bad == 0 ? 0 : 1;
    }

    public static void main(String[] args) throws Exception {
        if (args.length < 1) {
            System.err.println("usage: vectors FILE... | publish BOOTSTRAP TOPIC OUT | read BOOTSTRAP TOPIC");
            System.exit(2);
        }
        Pod pod = new Pod();
        int code = switch (args[0]) {
            case "vectors" -> pod.vectors(List.of(args).subList(1, args.length));
            case "publish" -> pod.publish(args[1], args[2], args[3]);
            case "read" -> pod.read(args[1], args[2]);
            default -> 2;
        };
        System.exit(code);
    }
}
